"""bench/report.py: the verdicts, the numbers and the chart the bench suite writes."""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.dom.minidom
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_report"] = report  # its dataclasses look their module up
_SPEC.loader.exec_module(report)


def test_a_goal_is_met_only_within_its_ratio_and_its_ceiling():
    goal = report.Goal(ratio=1.2, most_ms=60)
    assert goal.met(55, 50)
    assert not goal.met(61, 55)  # within the ratio, over the ceiling
    assert not goal.met(59, 40)  # under the ceiling, over the ratio
    assert goal.met(None, 40) is None
    assert goal.met(50, None) is None
    assert report.Goal().met(120, 100)
    assert not report.Goal().met(125, 100)
    assert goal.text() == "≤ x1.2, ≤ 60 ms"


def test_the_verdict_follows_the_ratio_the_table_shows():
    assert report.ratio(49.6, 41.3) == 1.2
    assert report.Goal().met(49.6, 41.3)


def test_results_hold_the_machine_and_the_rows(tmp_path):
    path = tmp_path / "results.json"
    report.write_results(path, [{"row": "r", "ratio": 1.5}], {"cores": 2})
    data = json.loads(path.read_text())
    assert data == {"version": 1, "machine": {"cores": 2}, "rows": [{"row": "r", "ratio": 1.5}]}


def test_the_chart_is_svg_with_a_bar_per_measured_row_coloured_by_the_goal(tmp_path):
    path = tmp_path / "ratios.svg"
    report.ratio_chart(path, [("fast <a>", 0.9), ("slow", 2.5), ("unmeasured", None)])
    document = xml.dom.minidom.parse(str(path))
    bars = document.getElementsByTagName("rect")
    assert [b.getAttribute("fill") for b in bars] == ["#3a7", "#d73"]
    assert float(bars[1].getAttribute("width")) > float(bars[0].getAttribute("width"))
    texts = [t.firstChild.data for t in document.getElementsByTagName("text")]
    assert "fast <a>" in texts
    assert "unmeasured" not in texts
    assert len(document.getElementsByTagName("line")) == 1
