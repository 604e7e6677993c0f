"""`make shell` starts coi shell in the user's project, never in the coi checkout."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), *args], cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PWD": str(cwd)})


def test_make_shell_runs_coi_shell_in_the_directory_it_was_started_from(tmp_path):
    planned = make("-n", "shell", cwd=tmp_path).stdout
    assert f"bin/coi shell --workspace '{tmp_path}'" in planned
    named = make("-n", "shell", f"WORKSPACE={tmp_path}/project", cwd=ROOT).stdout
    assert f"bin/coi shell --workspace '{tmp_path}/project'" in named


def test_make_shell_refuses_the_coi_checkout_as_the_workspace():
    done = make("shell-workspace", cwd=ROOT)
    assert done.returncode == 2
    assert "make shell: name your project" in done.stderr
