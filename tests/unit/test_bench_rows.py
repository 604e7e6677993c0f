"""bench/porcelain.py: the rows bench/net.py hands over join the one table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from coi_common.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("bench_porcelain",
                                               ROOT / "bench" / "porcelain.py")
porcelain = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_porcelain"] = porcelain  # its dataclasses look their module up
_SPEC.loader.exec_module(porcelain)


def test_net_rows_join_the_table_with_their_ratio_against_the_nft_floor(tmp_path):
    written = tmp_path / "rows.json"
    written.write_text(json.dumps([{"label": "`coi-net apply NAME`",
                                    "this": [90.0, 110.0, 100.0], "floor": [10, 20, 30]}]))
    [row] = porcelain.net_rows(written)
    assert (row.label, row.runs, row.median("this"), row.median("floor")) == (
        "`coi-net apply NAME`", 3, 100.0, 20.0)
    table = porcelain.render_table([row], [porcelain.Column("floor", "raw incus floor"),
                                           porcelain.Column("this", "coi")])
    assert "| `coi-net apply NAME` (3 runs) | 20 / 30 | 100 / 110 | x5.00 | ≤ x1.2 | FAIL |" \
        in table


@pytest.mark.parametrize("text", ["not json", "{}", '[{"label": "x", "this": [1]}]',
                                  '[{"label": "x", "this": [], "floor": [1]}]',
                                  '[{"label": 3, "this": [1], "floor": [1]}]',
                                  '[{"label": "x", "this": ["1"], "floor": [1]}]'])
def test_net_rows_that_are_not_net_pys_are_refused_in_one_line(tmp_path, text):
    written = tmp_path / "rows.json"
    written.write_text(text)
    with pytest.raises(UsageError, match="--net-rows"):
        porcelain.net_rows(written)
