"""Start-up cost of coi commands against the raw floor, side by side in one run.

Prints a table of median wall times over N runs (default 21):
  python -c pass (the interpreter floor), incus version (the raw incus CLI
  floor), coi version (dispatcher + REST query of the server), coi version
  through bin/ (the checkout launcher), coi doctor --format json.
Target: `coi version` median under 80 ms.
Run: .venv/bin/python bench/startup.py [RUNS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"
TARGET_MS = 80.0


def median_ms(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    rows = [
        ("floor: python -c pass", [str(VENV / "python"), "-c", "pass"]),
        ("floor: incus version", ["incus", "version"]),
        ("floor: incus query /1.0", ["incus", "query", "/1.0"]),
        ("coi version (venv entry point)", [str(VENV / "coi"), "version"]),
        ("coi version (bin/ launcher)", [str(ROOT / "bin" / "coi"), "version"]),
        ("coi doctor --format json", [str(VENV / "coi"), "doctor", "--format", "json"]),
    ]
    print(f"{'command':<34} {'median ms':>10}")
    results = {}
    for label, argv in rows:
        results[label] = median_ms(argv, runs)
        print(f"{label:<34} {results[label]:>10.1f}")
    ours = results["coi version (venv entry point)"]
    verdict = "meets" if ours < TARGET_MS else "MISSES"
    print(f"coi version {verdict} the {TARGET_MS:.0f} ms target ({ours:.1f} ms, {runs} runs)")
    return 0 if ours < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
