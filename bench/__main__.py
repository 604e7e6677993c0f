"""`python -m bench` (and `make bench`): the bench suite, bench/net.py (what coi-net
costs, its own detailed table) and then porcelain.py (coi against the raw Incus floor,
with ratios, goals, results.json and ratios.svg), whose ONE table also holds net.py's
rows against their nft floor. Needs root; its arguments go to porcelain.py."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="coi-bench-") as folder:
        rows = Path(folder) / "net-rows.json"
        net = subprocess.run([sys.executable, str(HERE / "net.py"), "--rows", str(rows)],
                             check=False).returncode
        given = ["--net-rows", str(rows)] if rows.is_file() else []
        suite = subprocess.run([sys.executable, str(HERE / "porcelain.py"), *given,
                                *sys.argv[1:]], check=False).returncode
    return suite or net


if __name__ == "__main__":
    sys.exit(main())
