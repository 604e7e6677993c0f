"""Reliability loop: N consecutive `coi run -- true` in the default (restricted) mode.

Every run must exit 0. Incus's transient exec failures ("Failed to retrieve PID
of executing child process") are retried inside coi (coi_common.incus.retry_exec);
the runs trace into one file ($COI_TRACE, coi_common.trace) and its `retry` lines are
counted (an exec or start Incus did not begin, a kept-alive connection it had closed).
Prints one line per run and a summary: runs, failures, retries, median and slowest
wall time. Exit 1 when any run failed.

Run: .venv/bin/python bench/run_loop.py [RUNS] [-- extra coi run flags]
     (as the user to test; the image is $COI_DEFAULTS_IMAGE, default coi)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    args = sys.argv[1:]
    runs = int(args.pop(0)) if args and args[0].isdigit() else 50
    extra = args[1:] if args[:1] == ["--"] else []
    coi = os.environ.get("COI", str(ROOT / "bin" / "coi"))
    with tempfile.TemporaryDirectory(prefix="coi-run-loop-") as folder:
        trace = Path(folder) / "trace"
        trace.touch()
        env = {**os.environ, "COI_TRACE": str(trace)}
        times, failures = [], 0
        for number in range(1, runs + 1):
            started = time.perf_counter()
            done = subprocess.run([coi, "run", *extra, "--", "true"], env=env, cwd=folder,
                                  capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                failures += 1
                print(f"run {number}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        retries = sum(line.split()[2:3] == ["retry"] for line in trace.read_text().splitlines())
    print(f"runs: {runs}, failed: {failures}, retries: {retries}, "
          f"median {statistics.median(times):.2f} s, slowest {max(times):.2f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
