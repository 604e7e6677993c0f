"""A newcomer's tour as the installed non-root user in the default (restricted) mode:
the everyday commands, their help, their mistakes; nothing any of them prints names one
of coi's internal executables (coi-slot, coi-shell, ...): the user typed `coi NAME`."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.incus

INTERNAL = re.compile(r"\bcoi-(slot|shell|session|net|image|host|container|dispatch)\b")
TOUR = [
    ["--help"], ["help"], ["help", "shell"], ["version"], ["images"], ["doctor"],
    ["config", "show"], ["list"], ["list", "--all"], ["run", "--", "true"],
    ["run", "--", "sh", "-c", "exit 3"], ["run", "--persistent", "--", "touch", "made"],
    ["list", "--format", "json"], ["info"], ["session", "list"], ["network", "status"],
    ["pool", "status"], ["tmux", "list"], ["persist", "--all", "--force"],
    ["shutdown", "--all", "--force", "--timeout", "5"], ["clean", "--force"],
    ["kill", "--all", "--force"], ["image", "list"], ["image", "exists", "nosuch"],
    ["session"], ["container"], ["file"], ["tmux"], ["network"], ["pool"], ["image"],
    # mistakes
    ["lsit"], ["list", "--bogus"], ["run"], ["shell", "--slot", "many"],
    ["shell", "--network", "wide"], ["attach", "coi-test-nosuch-1"], ["kill"],
    ["session", "show", "nosuch-id"], ["info", "nosuch-id"], ["image", "delete", "nosuch"],
    ["container", "exec", "coi-test-nosuch-1", "--", "true"], ["file", "pull", "x", "y"],
    ["tmux", "send", "coi-test-nosuch-1", "hello"], ["network", "apply", "coi-test-nosuch-1"],
    ["completion", "tcsh"], ["help", "image", "nosuch"], ["shutdown", "--timeout", "soon",
                                                           "--all"],
]


def test_no_message_of_the_tour_names_an_internal_executable(user_coi):
    seen, said = [], {}
    for args in TOUR:
        done = user_coi(*args, timeout=300)
        said[" ".join(args)] = done.stderr
        found = INTERNAL.search(done.stdout + done.stderr)
        if found:
            seen.append(f"coi {' '.join(args)}: {found.group(0)} in "
                        f"{(done.stdout + done.stderr)[max(0, found.start() - 80):][:200]!r}")
        assert "Traceback" not in done.stderr, (args, done.stderr)
    assert not seen, "\n".join(seen)
    assert (user_coi.workspace / "made").exists()  # the tour did run sessions
    assert said["lsit"].startswith("coi: 'lsit' is not a coi command")
    assert said["run"].startswith("coi run: missing <command>")
    assert said["shell --network wide"].startswith("coi shell: ")


def test_colour_shows_on_a_terminal_and_never_with_no_color(user_coi):
    def on_a_terminal(**env: str) -> str:
        done = user_coi.user.run(
            ["script", "-qec", f"{user_coi.user.coi} doctor", "/dev/null"],
            env={**user_coi.env, "TERM": "xterm-256color", **env}, cwd=user_coi.workspace)
        return done.stdout

    assert "\x1b[32mok  \x1b[0m" in on_a_terminal()
    assert "\x1b[" not in on_a_terminal(NO_COLOR="1")
    assert "ok   " in on_a_terminal(NO_COLOR="1")
