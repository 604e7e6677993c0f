"""Run every test (lint, pytest, bats) and end with one line counting them all.

A run that executes no test fails: an empty suite must never look green.
Exit status is non-zero when anything failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tests" / ".results"


LINTERS = (
    [sys.executable, "-m", "ruff", "check", "."],
    # The import contracts of pyproject.toml: lib imports no executable, and no
    # executable imports another.
    [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
)


def run_lint() -> tuple[int, int]:
    results = [subprocess.run(argv, cwd=ROOT, check=False).returncode for argv in LINTERS]
    return results.count(0), len(results) - results.count(0)


def run_pytest() -> tuple[int, int, int]:
    report = RESULTS / "pytest.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                    f"--junitxml={report}", *sys.argv[1:]], cwd=ROOT, check=False)
    if not report.exists():
        return 0, 1, 0
    suite = ET.parse(report).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def run_bats() -> tuple[int, int, int]:
    files = sorted(str(p) for p in (ROOT / "tests" / "bats").glob("*.bats"))
    if not files:
        return 0, 0, 0
    env = {**os.environ, "COI_ROOT": str(ROOT)}
    done = subprocess.run(["bats", "--tap", *files], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    passed = failed = skipped = 0
    for line in done.stdout.splitlines():
        if re.match(r"ok \d+ .*# skip", line):
            skipped += 1
        elif line.startswith("ok "):
            passed += 1
        elif line.startswith("not ok "):
            failed += 1
    if done.returncode != 0 and failed == 0:
        failed = 1  # bats itself broke (syntax error, missing library)
    return passed, failed, skipped


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    lint_passed, lint_failed = run_lint()
    py_passed, py_failed, py_skipped = run_pytest()
    bats_passed, bats_failed, bats_skipped = run_bats()
    passed = lint_passed + py_passed + bats_passed
    failed = lint_failed + py_failed + bats_failed
    skipped = py_skipped + bats_skipped
    print(f"lint: {'ok' if not lint_failed else 'FAILED'}; pytest: {py_passed} passed, "
          f"{py_failed} failed; bats: {bats_passed} passed, {bats_failed} failed")
    print(f"all: {passed} passed, {failed} failed, {skipped} skipped")
    if py_passed + bats_passed == 0:
        print("no test ran: that is a failure", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
