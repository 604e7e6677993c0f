"""The full `coi build` (slow: minutes the first time; cached afterwards like the test image).

It builds under the alias `coi-test-full-image` from the offline base
bootstrap:debian/bookworm, exactly as `coi build` does for users without the
images: remote, with every shipped AI tool (`[image] tools`): Claude Code,
Aider, Codex CLI and Gemini CLI. The image is kept between runs (the sweeper
spares it), so later runs only prove it is up to date and check what it
contains.
"""

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from coi_common import tools
from coi_common.errors import CommandFailed
from coi_image import build
from coi_image.builder import Builder

pytestmark = [pytest.mark.incus, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ALIAS = "coi-test-full-image"


def coi_build(env, timeout):
    return subprocess.run([str(ROOT / "bin" / "coi"), "build", "--base",
                           "bootstrap:debian/bookworm"], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def full_image(incus_run_lock):
    """Build (or confirm) the full image once for this module.

    The run lock comes first: without it another run's sweep could remove the builder.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("COI_")}
    env |= {"COI_DEFAULTS_IMAGE": ALIAS, "COI_CONTAINER_PREFIX": "coi-test-full-",
            "COI_IMAGE_TOOLS": "claude,aider,codex,gemini"}
    done = coi_build(env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def test_second_build_is_up_to_date_in_under_a_second(full_image):
    started = time.monotonic()
    done = coi_build(full_image, timeout=60)
    assert time.monotonic() - started < 1.0
    assert done.returncode == 0
    assert done.stdout.startswith(f"{ALIAS} is up to date")


@pytest.fixture(scope="module")
def session_box(full_image, incus_client):
    """A container of the full image as `coi container launch` makes it: the kernel
    policy a session has (nesting for Docker, no setuid files)."""
    name = "coi-test-full-session"
    incus_client.delete_instance_force(name)
    done = subprocess.run([str(ROOT / "bin" / "coi"), "container", "launch", ALIAS, name],
                          env=full_image, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    yield name
    incus_client.delete_instance_force(name)


def as_code(run_in, name, command):
    return run_in(name, ["sudo", "-u", "code", "-H", "bash", "-lc", command], timeout=60)


def test_code_is_uid_1000_and_may_power_off_without_a_password(session_box, run_in):
    assert as_code(run_in, session_box, "id -u").stdout == "1000\n"
    allowed = as_code(run_in, session_box, "sudo -n -l /sbin/poweroff")
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize(("command", "expected"), [
    ("tmux -V", "tmux "), ("git --version", "git version"), ("node --version", "v22."),
    ("npm --version", ""), ("gh --version", "gh version"), ("claude --version", "Claude Code"),
    ("aider --version", "aider "), ("codex --version", "codex-cli "),
    ("gemini --version", "."), ("jq --version", "jq-"), ("python3 --version", "Python 3"),
])
def test_tools_answer_as_code(session_box, run_in, command, expected):
    done = as_code(run_in, session_box, command)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_node_trusts_the_system_ca_store(session_box, run_in):
    done = as_code(run_in, session_box, "echo $NODE_EXTRA_CA_CERTS")
    assert done.stdout.strip() == "/etc/ssl/certs/ca-certificates.crt"


def test_dockerd_starts_in_a_nested_session_container(session_box, run_in):
    deadline = time.monotonic() + 90
    info = None
    while time.monotonic() < deadline:
        info = run_in(session_box, ["docker", "info", "--format", "{{.ServerVersion}}"])
        if info.returncode == 0:
            break
        time.sleep(1)
    assert info is not None
    assert info.returncode == 0, info.stderr
    assert info.stdout.strip()


def test_a_custom_build_on_top_of_the_full_image_publishes_and_cleans_up(
        full_image, incus_client, run_in, tmp_path):
    """The ~1 GiB publish takes longer than any single socket timeout: it is waited for,
    and the result carries what the script made; no image is left without an alias."""
    alias = f"coi-test-custom-{os.getpid()}"
    script = tmp_path / "setup.sh"
    script.write_text("#!/bin/sh\nset -e\necho custom-ok > /opt/custom-marker\n")
    before = {i["fingerprint"] for i in incus_client.images()}
    try:
        done = subprocess.run([str(ROOT / "bin" / "coi"), "build", "custom", alias, "--base",
                               ALIAS, "--script", str(script)], env=full_image,
                              capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        image = incus_client.image_by_alias(alias)
        assert image is not None
        box = f"{alias}-box"
        incus_client.create_instance(box, alias, profiles=["coi"], start=False)
        try:
            incus_client.set_state(box, "start")
            seen = run_in(box, ["cat", "/opt/custom-marker"])
            assert seen.stdout == "custom-ok\n", seen.stderr
        finally:
            incus_client.delete_instance_force(box)
        new = [i for i in incus_client.images() if i["fingerprint"] not in before]
        assert [i["fingerprint"] for i in new] == [image["fingerprint"]]
        assert all(i.get("aliases") for i in new)
    finally:
        found = incus_client.image_by_alias(alias)
        if found is not None:
            incus_client.delete_image(found["fingerprint"])


def test_every_version_check_passes_in_one_exec_on_the_full_image(session_box, incus_client,
                                                                  tmp_path):

    registry = tools.load_registry()
    selected = [tools.get_tool(name, registry) for name in ("claude", "aider", "codex", "gemini")]
    log = tmp_path / "log"
    build._check_versions(Builder(incus_client, session_box, str(log)),
                          SimpleNamespace(selected_tools=selected))
    script = set(build.version_script([*build.VERSION_CHECKS, *(
        (t.binary, *t.version_args) for t in selected)]).splitlines())
    answers = [line for line in log.read_text().splitlines()
               if line not in script and not line.startswith("$")]
    assert len(answers) >= len(build.VERSION_CHECKS) + len(selected)
    assert not [line for line in answers if line.startswith("version check failed")]


def test_a_missing_program_fails_the_version_checks_naming_it(session_box, incus_client,
                                                             tmp_path):

    missing = SimpleNamespace(binary="coi-test-no-such-tool", version_args=("--version",),
                              install=SimpleNamespace(method="npm"))
    log = tmp_path / "log"
    with pytest.raises(CommandFailed):
        build._check_versions(Builder(incus_client, session_box, str(log)),
                              SimpleNamespace(selected_tools=[missing]))
    assert "version check failed: coi-test-no-such-tool --version" in \
        log.read_text().splitlines()
