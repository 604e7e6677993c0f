"""`coi completion` loaded in real shells, as the installed non-root user: bash
(interactive, in a terminal, TAB pressed), fish (its own `complete -C`) and zsh (the
script loads and defines its function); the live names come from Incus, once per
cache time."""

from __future__ import annotations

import shlex

import pytest

pytestmark = pytest.mark.incus


@pytest.fixture
def running(user_coi, test_image):
    """A running container of the user's, named as coi names them."""
    name = f"{user_coi.prefix}ab12cd34-1"
    done = user_coi("container", "launch", test_image, name)
    assert done.returncode == 0, done.stderr
    return name


def shell_argv(user_coi, *command: str) -> list[str]:
    """`command` as the user with their login's environment and the test's COI_* ones."""
    exports = [f"{k}={v}" for k, v in {**user_coi.user.login_env(), **user_coi.env}.items()]
    return [shlex.join(["setpriv", "--reuid", str(user_coi.user.uid), "--regid",
                        str(user_coi.user.gid), "--init-groups", "env", "-i", *exports,
                        *command])]


def test_tab_in_bash_completes_commands_and_a_running_containers_name(user_coi, running,
                                                                      terminal):
    def bash_with_completion():
        term = terminal(shell_argv(user_coi, "bash", "--norc", "--noprofile", "-i"), None,
                        user_coi.workspace)
        # The prompt is spelled apart, so the echo of this line is not taken for it.
        term.type('eval "$(coi completion bash)"; PS1="rea""dy> "')
        term.wait_for("ready> ")
        return term

    commands = bash_with_completion()
    commands.keys("coi sh", "Tab", "Tab")
    commands.wait_for("shutdown")
    assert "shell" in commands.screen().split("coi sh", 1)[1]
    names = bash_with_completion()  # a fresh line: no half-typed command before it
    names.keys("coi attach ", "Tab")
    names.wait_for(f"coi attach {running}")


def test_fish_completes_commands_and_a_running_containers_name(user_coi, running):
    def fish(line: str) -> list[str]:
        done = user_coi.user.run(
            ["fish", "--no-config", "-c",
             f"coi completion fish | source; complete -C {shlex.quote(line)}"],
            env=user_coi.env, cwd=user_coi.workspace)
        assert done.returncode == 0, done.stderr
        return [row.split("\t")[0] for row in done.stdout.splitlines()]

    assert fish("coi sh") == ["shell", "shutdown"]
    assert fish("coi attach ") == [running]
    assert sorted(fish("coi shell --network ")) == ["allowlist", "open", "restricted"]


def test_zsh_loads_the_script_and_defines_the_completion(user_coi):
    done = user_coi.user.run(
        ["zsh", "-f", "-c", "source <(coi completion zsh) && whence -w _coi && "
         "print -r -- ${_comps[coi]}"], env=user_coi.env, cwd=user_coi.workspace)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["_coi:", "function", "_coi"]
    assert done.stderr == ""


def test_live_names_are_asked_of_incus_once_per_cache_time(user_coi, running, tmp_path):
    trace = user_coi.user.home / "complete-trace.log"

    def complete() -> list[str]:
        done = user_coi("__complete", "2", "attach", "", env={"COI_TRACE": str(trace)})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete() == [running]
    assert complete() == [running]
    requests = [line for line in trace.read_text().splitlines() if " GET /1.0/instances" in line]
    assert len(requests) == 1, requests
