"""Spares (coi_host.spare.Spare, entry's COI_SPARE): a coi program started before it
is needed, given its arguments on stdin later. Real coi-net processes from bin/."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from coi_common import proc
from coi_host.spare import Spare

COI_NET = str(Path(__file__).resolve().parents[2] / "bin" / "coi-net")


@pytest.fixture
def spare():
    kept = Spare(COI_NET)
    yield kept
    kept.close()


def test_a_spare_runs_the_arguments_it_is_given_as_the_program_would(spare):
    direct = proc.run([COI_NET, "--version"], check=False)
    done = spare.run(["--version"], timeout=30)
    assert (done.returncode, done.stdout) == (0, direct.stdout)
    assert done.argv == (COI_NET, "--version")


def test_each_run_leaves_the_next_spare_started_and_waiting(spare):
    spare.start()
    first = spare.waiting
    assert first is not None
    assert first.poll() is None
    spare.run(["--version"], timeout=30)
    assert first.poll() == 0  # the waiting one did the work
    assert spare.waiting is not None
    assert spare.waiting is not first
    assert spare.waiting.poll() is None


def test_a_spare_that_died_is_replaced_not_used(spare):
    spare.start()
    os.kill(spare.waiting.pid, 9)
    spare.waiting.wait()
    done = spare.run(["--version"], timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("coi-net ")


def test_a_failing_command_keeps_its_status_and_its_error_line(spare):
    done = spare.run(["status", "bad/name", "--format=json"], timeout=30)
    assert done.returncode == 2
    assert '"kind": "error"' in done.stdout
    assert "bad/name" in done.stdout


def test_a_spare_whose_caller_goes_away_ends_quietly():
    child = subprocess.Popen([COI_NET], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "COI_SPARE": "1"})
    time.sleep(0.2)
    out, err = child.communicate(b"", timeout=30)
    assert (child.returncode, out, err) == (0, b"", b"")


@pytest.mark.parametrize("line", [b"apply x\n", b'{"argv": []}\n', b'["ok", 3]\n', b"[" * 70000])
def test_a_spare_given_anything_but_an_array_of_strings_refuses_it(line):
    done = subprocess.run([COI_NET], check=False, input=line, capture_output=True, timeout=30,
                          env={**os.environ, "COI_SPARE": "1"})
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr.decode().strip() == \
        "spare: expected its arguments as one JSON array of strings"
