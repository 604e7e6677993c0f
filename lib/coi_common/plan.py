"""--dry-run: what a command would change, recorded as steps instead of done.

A command given --dry-run turns the plan on (entry.run_main calls start()) before it
does anything. From then on the few places that change state ask step() first and
make no change when it says the call was planned: the REST exchanges of
coi_common.incus that are not reads (POST, PUT, PATCH, DELETE), every exec in a
container, `incus` CLI calls that write, the coi programs a command runs
(plumbing.Child, with the JSON record it would be given) and the requests to coi's
host service. Reads (GET, HEAD, a host-service ping, a child that only looks) are
made, so the dry run walks the same code with the same data as the real run, and
assumes each change succeeds: an exec exits 0 with no output, a child answers what
its caller expects (plumbing.Child's `dry_run`).

A step's `call` is the text COI_TRACE writes for the same call in a real run
(trace.what), so a plan and the trace of the real run can be compared line for line
(tests/integration/test_dry_run.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final

from coi_common import trace

KIND: Final = "plan_step"
DETAIL_MAX: Final = 100
"""Characters of a step's body or input shown in the text plan (JSON shows them whole)."""
CONTRACT_VERSION: Final = 1
"""protocol.CONTRACT_VERSION, not imported: every Incus client loads this module."""
Record = dict[str, Any]
_steps: list[Record] | None = None


def start() -> None:
    """Plan from now on, in this process: nothing is changed, every change is a step."""
    global _steps  # noqa: PLW0603 - one plan per process, by design
    _steps = []


def stop() -> None:
    """Back to changing things (the plan is dropped)."""
    global _steps  # noqa: PLW0603 - one plan per process, by design
    _steps = None


os.register_at_fork(after_in_child=stop)  # a fork's program plans only if asked itself


def active() -> bool:
    return _steps is not None


def step(kind: str, words: trace.Words, **detail: Any) -> bool:
    """Record a change about to be made (`kind` and `words` as the call's trace line
    names them; `detail`: its body or input) when planning. True when it was
    recorded: the caller must then not make it."""
    if _steps is None:
        return False
    _append(trace.what(kind, words), detail)
    return True


def _append(call: str, detail: Mapping[str, Any]) -> None:
    assert _steps is not None
    _steps.append({"coi": CONTRACT_VERSION, "kind": KIND, "step": len(_steps) + 1,
                   "call": call, **{k: v for k, v in detail.items() if v is not None}})


def adopt(program: str, records: Sequence[Mapping[str, Any]]) -> None:
    """The steps a coi child planned in its own dry run (its plan_step records), as
    ours, marked with the program that would make them."""
    for record in records:
        if _steps is not None and record.get("kind") == KIND and \
                isinstance(record.get("call"), str):
            detail = {k: v for k, v in record.items()
                      if k not in ("coi", "kind", "step", "call", "by")}
            _append(str(record["call"]), {"by": program, **detail})


def steps() -> list[Record]:
    return list(_steps or [])


def render(*, as_json: bool) -> None:
    """Print the plan on stdout: plan_step records, or one numbered line per step."""
    if _steps is None:
        return
    if as_json:
        for record in _steps:
            print(json.dumps(record, default=str))
        sys.stdout.flush()
        return
    print(f"dry run: nothing was changed; the real run makes {len(_steps)} "
          f"change{'s' if len(_steps) != 1 else ''} (--format json: each in full):")
    for record in _steps:
        extra = {k: v for k, v in record.items() if k not in ("coi", "kind", "step", "call")}
        by = f"[{extra.pop('by')}] " if "by" in extra else ""
        detail = json.dumps(extra, sort_keys=True) if extra else ""
        tail = f"  {detail if len(detail) <= DETAIL_MAX else detail[:DETAIL_MAX - 3] + '...'}" \
            if detail else ""
        print(f"{record['step']:3}. {by}{record['call']}{tail}")
    sys.stdout.flush()
