"""What the bench suite reports: goals and verdicts, machine facts, results.json and
a chart of the ratios (SVG, no plotting library). Used by porcelain.py."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

RATIO_GOAL: Final = 1.2
"""The issue's goal for every row: coi within 20 % of its raw floor."""


@dataclass(frozen=True)
class Goal:
    """A row's goal: this checkout's median at most `ratio` times the floor's, and at
    most `most_ms` (either may be None)."""

    ratio: float | None = RATIO_GOAL
    most_ms: float | None = None

    def text(self) -> str:
        parts = [f"≤ x{self.ratio:g}"] if self.ratio is not None else []
        parts += [f"≤ {self.most_ms:g} ms"] if self.most_ms is not None else []
        return ", ".join(parts) or "-"

    def met(self, this_ms: float | None, floor_ms: float | None) -> bool | None:
        """True or False, None when a number it needs is missing."""
        if this_ms is None:
            return None
        checks = []
        if self.ratio is not None:
            found = ratio(this_ms, floor_ms)
            if found is None:
                return None
            checks.append(found <= self.ratio)  # the ratio as the table shows it
        if self.most_ms is not None:
            checks.append(this_ms <= self.most_ms)
        return all(checks)


def ratio(this_ms: float | None, floor_ms: float | None) -> float | None:
    if this_ms is None or not floor_ms:
        return None
    return round(this_ms / floor_ms, 2)


def machine_facts() -> dict[str, Any]:
    """Where the numbers came from: cores, kernel, Python, Incus and its storage."""
    facts: dict[str, Any] = {"cores": os.cpu_count(), "kernel": platform.release(),
                             "python": platform.python_version()}
    version = _out(["incus", "version"])
    facts["incus"] = version.splitlines()[-1].split(":")[-1].strip() if version else None
    pools = _out(["incus", "storage", "list", "--format", "json"])
    try:
        facts["storage"] = {p["name"]: p["driver"] for p in json.loads(pools or "[]")}
    except (ValueError, KeyError, TypeError):
        facts["storage"] = None
    return facts


def _out(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def write_results(path: Path, records: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    path.write_text(json.dumps({"version": 1, "machine": facts, "rows": records}, indent=2)
                    + "\n")


def ratio_chart(path: Path, bars: Sequence[tuple[str, float | None]],
                goal: float = RATIO_GOAL) -> None:
    """A horizontal bar per row (coi / floor), the goal as a red line; rows without a
    ratio are left out."""
    shown = [(label, value) for label, value in bars if value is not None]
    width, left, bar, gap = 760, 330, 18, 8
    top = max([goal * 1.25, *(value for _, value in shown)])
    scale = (width - left - 40) / top
    height = 40 + len(shown) * (bar + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             '<text x="10" y="18" font-weight="bold">coi / raw floor (median)</text>']
    for number, (label, value) in enumerate(shown):
        y = 30 + number * (bar + gap)
        colour = "#3a7" if value <= goal else "#d73"
        parts += [f'<text x="10" y="{y + 13}">{_escape(label[:48])}</text>',
                  f'<rect x="{left}" y="{y}" width="{value * scale:.1f}" height="{bar}" '
                  f'fill="{colour}"/>',
                  f'<text x="{left + value * scale + 4:.1f}" y="{y + 13}">x{value:.2f}</text>']
    x = left + goal * scale
    parts += [f'<line x1="{x:.1f}" y1="26" x2="{x:.1f}" y2="{height - 4}" stroke="red" '
              'stroke-dasharray="4 3"/>', "</svg>"]
    path.write_text("\n".join(parts) + "\n")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
