"""coi build custom on the cached test image: results, caching, failures, interruption."""

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from coi_common.errors import NotFound

pytestmark = pytest.mark.incus

ROOT = Path(__file__).resolve().parents[2]
COI = str(ROOT / "bin" / "coi")


def coi(args, env, timeout=300):
    return subprocess.run([COI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


@pytest.fixture
def image_alias(coi_env, incus_client):
    """An alias for the image a test builds; the image is deleted afterwards."""
    alias = f"{coi_env.prefix}img"
    yield alias
    image = incus_client.image_by_alias(alias)
    if image:
        incus_client.delete_image(image["fingerprint"])


@pytest.fixture
def builds_removed(incus_client, tmp_path):
    """Every image built from a script under tmp_path goes at the end, also one without alias."""
    yield
    for image in incus_client.images():
        if image["properties"].get("coi.custom_script", "").startswith(f"{tmp_path}/"):
            with contextlib.suppress(NotFound):
                incus_client.delete_image(image["fingerprint"])


def script(folder, body, name="build.sh"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"set -e\n{body}\n")
    return path


def leftovers(client, prefix):
    containers = [i["name"] for i in client.instances(prefix)]
    tmp_aliases = [a["name"] for image in client.images() for a in image.get("aliases") or []
                   if a["name"].startswith(f"{prefix}tmp-")]
    return containers, tmp_aliases


def build_custom(alias, path, env, *extra):
    return coi(["build", "custom", alias, "--script", str(path), "--base", "coi-test-image",
                *extra], env)


def test_custom_build_publishes_an_image_holding_what_the_script_wrote(
        coi_env, incus_client, image_alias, tmp_path, make_container, run_in):
    path = script(tmp_path, "echo built-by-coi-test > /etc/coi-test-marker")
    done = build_custom(image_alias, path, coi_env.environ(), "--format", "json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["kind"] == "image"
    assert record["rebuilt"] is True
    assert record["properties"]["coi.base"] == "coi-test-image"
    assert record["fingerprint"] == incus_client.image_by_alias(image_alias)["fingerprint"]
    assert leftovers(incus_client, coi_env.prefix) == ([], [])
    container = f"{coi_env.prefix}check"
    incus_client.create_instance(container, image_alias, profiles=["coi"], start=True)
    try:
        assert run_in(container, ["cat", "/etc/coi-test-marker"]).stdout == "built-by-coi-test\n"
    finally:
        incus_client.delete_instance_force(container)


def test_unchanged_custom_build_is_up_to_date_in_under_a_second_and_force_rebuilds(
        coi_env, incus_client, image_alias, tmp_path):
    path = script(tmp_path, "echo one > /etc/coi-test-one")
    assert build_custom(image_alias, path, coi_env.environ()).returncode == 0
    first = incus_client.image_by_alias(image_alias)["fingerprint"]
    started = time.monotonic()
    again = build_custom(image_alias, path, coi_env.environ())
    assert time.monotonic() - started < 1.0
    assert again.returncode == 0
    assert "is up to date" in again.stdout
    forced = build_custom(image_alias, path, coi_env.environ(), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"built {image_alias}")
    assert incus_client.image_by_alias(image_alias)["fingerprint"] != first


def test_the_same_script_content_at_another_path_is_up_to_date(coi_env, incus_client,
                                                               image_alias, tmp_path):
    body = "echo same > /etc/coi-test-same"
    assert build_custom(image_alias, script(tmp_path / "one", body), coi_env.environ()) \
        .returncode == 0
    moved = script(tmp_path / "elsewhere" / "two", body, "renamed.sh")
    again = build_custom(image_alias, moved, coi_env.environ())
    assert again.returncode == 0, again.stderr
    assert "is up to date" in again.stdout


def test_failing_script_exits_non_zero_shows_the_log_and_keeps_the_old_image(
        coi_env, incus_client, image_alias, tmp_path):
    good = script(tmp_path, "echo good > /etc/coi-test-good", "good.sh")
    assert build_custom(image_alias, good, coi_env.environ()).returncode == 0
    before = incus_client.image_by_alias(image_alias)["fingerprint"]
    bad = script(tmp_path, "echo about-to-fail-coi-test\nexit 3", "bad.sh")
    done = build_custom(image_alias, bad, coi_env.environ())
    assert done.returncode == 1
    assert "about-to-fail-coi-test" in done.stderr  # the log's tail
    log = done.stderr.split("full log: ")[1].split(")")[0]
    assert Path(log).is_file()
    assert "Traceback" not in done.stderr
    assert incus_client.image_by_alias(image_alias)["fingerprint"] == before
    assert leftovers(incus_client, coi_env.prefix) == ([], [])


def test_sigterm_during_a_build_removes_the_builder_and_keeps_the_old_image(
        coi_env, incus_client, image_alias, tmp_path):
    good = script(tmp_path, "true", "good.sh")
    assert build_custom(image_alias, good, coi_env.environ()).returncode == 0
    before = incus_client.image_by_alias(image_alias)["fingerprint"]
    slow = script(tmp_path, "touch /tmp/coi-test-started\nsleep 120", "slow.sh")
    # SIGINT as a terminal's shell leaves it: a test run started in the background
    # inherits it ignored, and an ignored SIGINT is not coi's to undo.
    child = subprocess.Popen([COI, "build", "custom", image_alias, "--script", str(slow),
                              "--base", "coi-test-image"], env=coi_env.environ(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)  # noqa: PLW1509 - no threads
    try:
        builder = wait_for_builder_running_script(incus_client, coi_env.prefix)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert not incus_client.instance_exists(builder)
    assert incus_client.image_by_alias(image_alias)["fingerprint"] == before
    assert leftovers(incus_client, coi_env.prefix) == ([], [])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_publish_interrupted_halfway_leaves_no_image_and_no_temporary_alias(
        coi_env, incus_client, image_alias, tmp_path, builds_removed, signum):
    # Incompressible data makes the publish last a few seconds, long enough to interrupt.
    slow = script(tmp_path, "touch /tmp/coi-test-started\n"
                            "head -c 300M /dev/urandom > /root/coi-test-noise", "noise.sh")
    # SIGINT as a terminal's shell leaves it: a test run started in the background
    # inherits it ignored, and an ignored SIGINT is not coi's to undo.
    child = subprocess.Popen([COI, "build", "custom", image_alias, "--script", str(slow),
                              "--base", "coi-test-image"], env=coi_env.environ(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_default_sigint)  # noqa: PLW1509 - no threads
    try:
        builder = wait_for_builder_running_script(incus_client, coi_env.prefix)
        wait_for_publish(incus_client, builder)
        child.send_signal(signum)
        _, err = child.communicate(timeout=120)
    finally:
        stop(child)
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert "waiting for it to end, to remove the half-way image" in err  # hit mid-publish
    assert not incus_client.instance_exists(builder)
    assert incus_client.image_by_alias(image_alias) is None
    assert [i["fingerprint"] for i in incus_client.images()
            if i["properties"].get("coi.custom_script") == str(slow)] == []
    assert leftovers(incus_client, coi_env.prefix) == ([], [])


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(child):
    """A build still running after a failed test: SIGTERM lets it remove its builder."""
    if child.poll() is None:
        child.terminate()
        try:
            child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()


def wait_for_publish(client, builder, timeout=120):
    """Until the builder is stopped and Incus runs an image-making operation: the publish."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Without recursion: the state Incus adds with it fails ("Invalid PID") while stopping.
        if client.request("GET", f"/1.0/instances/{builder}")["status"] == "Stopped":
            running = client.request("GET", "/1.0/operations",
                                     params={"recursion": "1"}).get("running") or []
            if any(op["description"] == "Downloading image" for op in running):
                return
        time.sleep(0.05)
    pytest.fail("the builder was never published")


def wait_for_builder_running_script(client, prefix, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for instance in client.instances(f"{prefix}build-"):
            started = client.cli(["exec", instance["name"], "--", "test", "-e",
                                  "/tmp/coi-test-started"], check=False)
            if started.ok:
                return instance["name"]
        time.sleep(0.3)
    pytest.fail("the builder never started the script")
    return ""


def test_missing_script_is_refused_before_any_container_exists(coi_env, incus_client,
                                                               image_alias, tmp_path):
    done = build_custom(image_alias, tmp_path / "nope.sh", coi_env.environ())
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0
    assert "does not exist" in done.stderr
    assert leftovers(incus_client, coi_env.prefix) == ([], [])


def test_a_directory_as_script_is_bad_input(coi_env, image_alias, tmp_path):
    done = build_custom(image_alias, tmp_path, coi_env.environ())
    assert done.returncode == 2
    assert "not a readable file" in done.stderr


@pytest.mark.parametrize(("base", "code", "text"), [
    ("bootstrap:debian", 2, "expected bootstrap:DISTRO/RELEASE"),
    ("coi-test-no-such-base", 3, "does not exist"),
    ("../etc", 2, "image name"),
])
def test_bad_or_missing_base_is_one_line(coi_env, image_alias, tmp_path, base, code, text):
    path = script(tmp_path, "true")
    done = coi(["build", "custom", image_alias, "--script", str(path), "--base", base],
               coi_env.environ())
    assert done.returncode == code
    assert text in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_force_deleting_a_missing_builder_is_a_no_op(incus_client, coi_env):
    name = f"{coi_env.prefix}never-existed"
    incus_client.delete_instance_force(name)
    assert not incus_client.instance_exists(name)


def test_dns_fix_step_writes_static_resolvers_that_survive_dhcp(make_container, run_in,
                                                                 incus_client, bridge_subnet):
    # The bridge's own dnsmasq stands in for a public resolver: no packet leaves the host.
    resolver = str(next(bridge_subnet.hosts()))
    box = make_container()
    recipe = ROOT / "coi-image" / "coi_image" / "build-coi.sh"
    incus_client.push_file(box.name, str(recipe), "/root/coi-build.sh", mode="0755")
    fixed = run_in(box.name, ["bash", "/root/coi-build.sh", "dns_static", resolver])
    assert fixed.returncode == 0, fixed.stderr
    assert run_in(box.name, ["cat", "/etc/resolv.conf"]).stdout == f"nameserver {resolver}\n"
    hook = run_in(box.name, ["cat", "/etc/dhcp/dhclient-enter-hooks.d/coi-static-dns"])
    assert "make_resolv_conf() { :; }" in hook.stdout
    assert run_in(box.name, ["getent", "hosts", f"{box.name}.incus"]).returncode == 0


def test_ca_certificates_go_into_the_image_in_one_exec(coi_env, incus_client, image_alias,
                                                      tmp_path, builds_removed, run_in,
                                                      open_tmp):
    certificates = []  # under a short path, so that trace lines show it whole
    for name in ("first", "second"):
        key, cert = open_tmp / f"{name}.key", open_tmp / f"{name}.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", f"/CN=coi-test-{name}", "-keyout", str(key), "-out",
                        str(cert)], check=True, capture_output=True, timeout=60)
        certificates.append(cert)
    (coi_env.config_home / "coi").mkdir(parents=True, exist_ok=True)
    (coi_env.config_home / "coi" / "config.toml").write_text(
        f"[image]\nhost_ca_certificates = false\nextra_ca_certificates = "
        f"{json.dumps([str(c) for c in certificates])}\n")
    trace = tmp_path / "trace"
    path = script(tmp_path / "recipe", "true")
    done = build_custom(image_alias, path, {**coi_env.environ(), "COI_TRACE": str(trace)})
    assert done.returncode == 0, done.stderr
    lines = trace.read_text().splitlines()
    assert [line for line in lines if "file push" in line and str(open_tmp) in line] == []
    assert len([line for line in lines if " exec " in line and
                "/usr/local/share/ca-certificates/coi" in line]) == 1
    container = f"{coi_env.prefix}check"
    incus_client.create_instance(container, image_alias, profiles=["coi"], start=True)
    try:
        for number, cert in enumerate(certificates):
            inside = f"/usr/local/share/ca-certificates/coi/host-{number}-{cert.stem}.crt"
            assert run_in(container, ["cat", inside]).stdout == cert.read_text()
            assert run_in(container, ["stat", "-c", "%u %a", inside]).stdout == "0 644\n"
        bundle = run_in(container, ["cat", "/etc/ssl/certs/ca-certificates.crt"]).stdout
        assert all(cert.read_text().strip() in bundle for cert in certificates)
    finally:
        incus_client.delete_instance_force(container)
