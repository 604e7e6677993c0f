"""How a coi executable runs another one: as a process, records in and out.

`coi shell` is `coi-slot next`, `coi-net apply`, `coi-session restore` and
`coi-slot end` run one after another (docs/architecture.md), each a child
process given its JSON record on stdin and asked for `--format json`; what it
prints on stdout is read as JSON Lines records. Its stderr is the user's:
progress and warnings (an allowlist name that did not resolve) reach the
terminal as the child wrote them. A failure comes back as the error kind and
message of the child's `error` record; the child, run with COI_PLUMBING=1,
leaves the one-line message to the parent, so the user reads it once, from
the command they ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from coi_common import forks, plan, proc, trace
from coi_common.entry import PLUMBING_VARIABLE
from coi_common.errors import ALL_ERRORS, CoiError, NotFound
from coi_common.executables import find_executable
from coi_common.protocol import Record, parse_record

MAX_OUTPUT: Final = 4 * 1024 * 1024
"""Most bytes a child's stdout may carry (its records); more is refused, not read."""
_BY_CODE: Final = {kind.code: kind for kind in ALL_ERRORS}


READS: Final = "reads"
"""Child.dry_run: the child changes nothing (`coi-session restore --check`): run as is."""
ASKS: Final = "asks"
"""Child.dry_run: the child is run with --dry-run; its answer is ours, its steps join
our plan (`coi-slot next`, whose record the rest of the run needs)."""
DryRun = str | Sequence[Record]
"""What a Child does in a --dry-run (coi_common.plan): READS, ASKS, or the records it is
assumed to answer, when it is not run at all (a step with its JSON input instead)."""


def call(program: str, args: Sequence[str], *, record: Mapping[str, Any] | None = None,
         kind: str | tuple[str, ...] | None = None,
         as_user: pwd.struct_passwd | None = None, dry_run: DryRun = ()) -> list[Record]:
    """Run coi's `program` (found beside this one) with `args` and `--format json`,
    `record` on its stdin; return its records (of `kind`, when given). Waits as long
    as the child works: every child coi runs bounds its own waits. `as_user` (root
    only): the child runs as that account (as_account). `dry_run`: see DryRun."""
    return Child(program, args, kind=kind, as_user=as_user, dry_run=dry_run).finish(record)


class Child:
    """A coi program started now and given its record later (finish): its start-up
    (~30-40 ms of Python and imports) runs while the parent waits on Incus, since the
    child only reads its stdin once it is ready. abandon() stops one not needed after
    all; it has done nothing but wait for its record. In a --dry-run (coi_common.plan)
    it is run, or not, as `dry_run` says (DryRun)."""

    def __init__(self, program: str, args: Sequence[str], *,
                 kind: str | tuple[str, ...] | None = None,
                 as_user: pwd.struct_passwd | None = None, dry_run: DryRun = ()) -> None:
        path = find_executable(program)
        if path is None:
            raise NotFound(f"{program} is not installed (neither next to coi nor on PATH)")
        self.program, self.words, self.kind = program, [program, *args], kind
        self.assumed = None if isinstance(dry_run, str) or not plan.active() else \
            [dict(r) for r in dry_run]
        self.asks = plan.active() and dry_run == ASKS
        self.given: Mapping[str, Any] | None = None
        if self.assumed is not None:
            self.process = None
            return
        flags = [*args, *(["--dry-run"] if self.asks else []), "--format", "json"]
        self.started = time.perf_counter()
        module = None if as_user else own_module(program, path)
        if module is not None:
            self.process = forks.fork_program(program, module, flags,
                                              {PLUMBING_VARIABLE: "1"})
            return
        argv = ["env", f"{PLUMBING_VARIABLE}=1", path, *flags]
        self.process = proc.spawn(as_account(as_user, argv) if as_user else argv,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def give(self, record: Mapping[str, Any]) -> None:
        """Send `record` now and let the child work while the caller goes on; finish()
        (without a record) then collects its answer. The record is one line, far less
        than a pipe holds, so this never waits for the child."""
        self.given = record
        if self.process is not None and self.process.stdin is not None:
            stdin, self.process.stdin = self.process.stdin, None  # not communicate()'s now
            with contextlib.suppress(BrokenPipeError), stdin:  # ended already: finish() says
                stdin.write((json.dumps(record) + "\n").encode())

    def finish(self, record: Mapping[str, Any] | None = None) -> list[Record]:
        """Send `record` (unless give() did), wait for the child's end, return its
        records (or raise its failure). Traced as one call, from its start."""
        record = record if self.given is None else self.given
        if self.process is None or self.asks:
            plan.step("child", self.words, input=record)
        if self.process is None:
            return [r for r in self.assumed or [] if _of_kind(r, self.kind)]
        payload = None if self.given is not None else \
            (json.dumps(record) + "\n").encode() if record is not None else b""
        try:
            out, _ = self.process.communicate(payload)
        except BaseException:
            proc.stop_group(self.process)
            raise
        trace.note("child", self.words, self.started, f"exit {self.process.returncode}")
        found = read_records(self.program, out, self.process.returncode, None)
        if self.asks:
            plan.adopt(self.program, found)
        return [r for r in found if r.get("kind") != plan.KIND and _of_kind(r, self.kind)]

    def abandon(self) -> None:
        """Stop the child, unless it has ended (its pid may be another's by now)."""
        if self.process is not None and self.process.poll() is None:
            proc.stop_group(self.process, grace=0)


_CHECKOUT_BIN: Final = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "bin")


def own_module(program: str, path: str) -> str | None:
    """The package to run `program` from in a fork (coi_common.forks), when `path`, the
    executable found for it, is this installation's own: the checkout's bin/ launcher or
    the script of the venv we run in. Anything else (a test's stub, another install on
    PATH) is started as what it is; so is every child when forks are off."""
    if not forks.enabled():
        return None
    ours = {os.path.join(_CHECKOUT_BIN, program), os.path.join(sys.prefix, "bin", program)}
    # The launchers in bin/ are links to bin/_launch named after their program (so their
    # folder is resolved, not the link); one in ~/.local/bin points at the venv's script.
    named = (path, os.path.realpath(path))
    return program.replace("-", "_") if any(
        os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p)) in ours
        for p in named) else None


def as_account(account: pwd.struct_passwd, argv: list[str]) -> list[str]:
    """argv run as `account` with its groups, home and name, and the caller's
    environment without coi's settings: the account's own config applies, never the
    caller's overrides (COI_*, XDG_CONFIG_HOME, sudo's variables; COI_TRACE stays)."""
    dropped = ("XDG_CONFIG_HOME", "SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND")
    env = {key: value for key, value in os.environ.items()
           if key not in dropped and (not key.startswith("COI_") or key == "COI_TRACE")}
    env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name)
    return ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
            "--init-groups", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def read_records(program: str, out: bytes, status: int, kind: str | tuple[str, ...] | None
                 ) -> list[Record]:
    """A finished child's records (of `kind`), or the failure it reported, as ours."""
    if len(out) > MAX_OUTPUT:
        raise CoiError(f"{program} printed more than {MAX_OUTPUT} bytes of records")
    records = [parse_record(line) for line in out.decode("utf-8", "replace").splitlines()
               if line.strip()]
    errors = [r for r in records if r.get("kind") == "error"]
    if status != 0 or errors:
        raise _reported(program, errors[0] if errors else None, status)
    return [r for r in records if _of_kind(r, kind)]


def _of_kind(record: Mapping[str, Any], kind: str | tuple[str, ...] | None) -> bool:
    return kind is None or record.get("kind") in ((kind,) if isinstance(kind, str) else kind)


def _reported(program: str, error: Record | None, status: int) -> CoiError:
    """The child's failure as the parent's: its kind and message (the child, asked
    as plumbing, printed it only as its error record)."""
    if error is None:
        return CoiError(f"{program} failed (exit {status}) without saying why")
    return _BY_CODE.get(str(error.get("code")), CoiError)(str(error.get("message")))
