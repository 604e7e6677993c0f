"""`python -m bench` (and `make bench`): the bench suite, porcelain.py (coi against the
raw Incus floor, with ratios, goals, results.json and ratios.svg), then net.py (what
coi-net costs). Needs root; its arguments go to porcelain.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    suite = subprocess.run([sys.executable, str(HERE / "porcelain.py"), *sys.argv[1:]],
                           check=False).returncode
    net = subprocess.run([sys.executable, str(HERE / "net.py")], check=False).returncode
    return suite or net


if __name__ == "__main__":
    sys.exit(main())
