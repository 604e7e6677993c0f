"""The bench suite: everyday coi commands against the raw Incus floor, before and after a
change, in one run (`make bench`, `python -m bench`).

Usage:
  porcelain.py [--baseline DIR] [--containers N] [--list-runs M] [--concurrent K]
               [--real-service] [--net-rows FILE] [--format FMT] [--debug] [<runs>]
  porcelain.py (-h | --help)

Prints ONE markdown table, ms as median / max, every column measured in this
run with the runs interleaved (baseline, this, floor, baseline, this, floor,
...) after one unrecorded warm-up of each, so machine drift hits every column
alike; then the ratio of this checkout to the floor, the row's goal (the
issue's: within 20 % of the floor, and for start-up at most 60 ms) and
whether it is met:

  row                          raw Incus floor (the least Incus work the same job needs)
  `coi run -- true` (open,     incus create IMAGE NAME + incus start + incus exec NAME --
  restricted, allowlist)       true + incus delete -f NAME, timed end to end
  `coi shell` to the prompt    incus create + incus start + incus exec -t NAME -- sh -c
                               "echo 'dummy>'" until its output is seen
  `coi list --format json`     incus list --format json PREFIX (none, then the same N
                               stopped containers, made by `coi run --persistent`)
  `coi version`, `coi --help`  python -c pass (the venv's interpreter)
  K concurrent `coi run`       K concurrent floors of `coi run` (wall time of all; the
                               failures of each side are counted, the goal is none)
  `coi session save NAME`      incus exec NAME -- tar -C /home/code -cf - .dummy | tar -x
  of a 50 MiB, 5,120-file      into a fresh folder (the state: `split` of 50 MiB of random
  state directory              bytes into 10 KiB files under ~/.dummy, made once)
  `coi session restore ID      tar -cf - of that folder | incus exec NAME --user 1000
  NAME` of it                  --group 1000 -- tar -x --no-same-owner -C /home/code
  (this checkout only: the baseline column is left out of these two rows)
  `coi run -- true` and `coi   the floors of `coi run` and `coi shell` above; this
  shell` to the prompt, from   checkout with pool.size 1, the pool filled and settled
  a warm pool of one           (the last run's end and refill over) before each timing
                               (no baseline column: it has no pool)
  `sudo poweroff` in `coi    incus create --ephemeral + incus start, booted (outside the
  shell`'s bash until the    timing), then incus exec NAME -- poweroff until the
  container is gone          container is gone
  coi-net apply, refresh     from bench/net.py (--net-rows): one `nft -j -f -` of the
                             same rules (this checkout only)

Peak RSS: every process of this checkout (its interpreter running a coi module:
the dispatcher, every executable, the host service) is sampled all along
(VmHWM, every 20 ms);
the largest is reported against the goal of 60 MB. Beside the table it
writes bench/results.json (every sample, the verdicts and the machine:
cores, kernel, Incus version, storage drivers) and bench/ratios.svg (a bar
per row of this checkout / floor, the goal as a line).

`coi shell` runs in a pseudo terminal with the `dummy` test tool, timed from
the start until its prompt `dummy>` is on the screen; the session is then
detached (Ctrl+b d) and ended with `coi kill --all --force`, outside the timing.
Default config otherwise: restricted network, ephemeral containers.

Who runs what: the bench runs as root and makes a fresh non-root member of
incus-admin (tests/fixtures_users.create_user: `coi-test-ubench<hex>`, home
under /tmp) who runs every command with the container prefix
`coi-test-bench<hex>-`, the test image (COI_DEFAULTS_IMAGE=coi-test-image,
made by `make test-image`) and COI_TOOL_NAME=dummy, in a workspace of theirs.
Each checkout gets its own `coi-host serve` on its own socket and nftables
table, as the tests do, so a column measures its own host service too; the
option --real-service makes both use the one `coi setup` started
(/run/coi/host.sock). Everything the bench makes is removed at the end and
on failure (its user by fixtures_users.remove_user, the rest by tests/sweep.py's
sweep of its prefix); what a killed bench leaves, `make sweep` removes like any
test leftover. It holds the test run lock, shared, so a concurrent test
session's sweep leaves its containers alone.

The baseline is another checkout, for example a git worktree of an older
commit with its own venv:
  git -C /work/main worktree add --detach /tmp/coi-baseline a755850
  make -C /tmp/coi-baseline venv
Without --baseline that column is left out.

Exit 0; 1 when a row of this checkout is more than 10 % AND more than 100 ms
slower (median) than the baseline (stderr names the row), or when a measured
command fails (stderr names the column, the command and its last error line).

Options:
  --baseline DIR    Checkout to compare with (its bin/coi and .venv).
  --containers N    Stopped containers present for the listing row [default: 10].
  --list-runs M     Runs of the listing and start-up rows [default: 11].
  --concurrent K    Sessions started at once in the concurrency row [default: 10].
  --real-service    Use the host service `coi setup` runs, not one per checkout.
  --net-rows FILE   Rows measured by `bench/net.py --rows FILE` (coi-net apply and
                    refresh against one nft -f), added to the table.
  --format FMT      text (the markdown table) or json (one array, a record per
                    row) [default: text].
  --debug           Show tracebacks on errors.
  -h --help         Show this help.

Arguments:
  <runs>            Runs of the `coi run` and `coi shell` rows (default 5).

Run: sudo .venv/bin/python bench/porcelain.py --baseline /tmp/coi-baseline 3
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "lib"), str(ROOT / "tests"), str(ROOT / "bench")]

import report  # noqa: E402 - bench/, beside this file

import fixtures_users  # noqa: E402 - needs the path above
import sweep  # noqa: E402
from coi_common import proc  # noqa: E402
from coi_common.entry import Args, run_main  # noqa: E402
from coi_common.errors import CommandFailed, UsageError  # noqa: E402
from coi_common.incus import Incus  # noqa: E402

IMAGE: Final = "coi-test-image"
PROFILE: Final = "coi"
PROMPT: Final = b"dummy>"
DETACH: Final = b"\x02d"  # Ctrl+b d: tmux's detach
SCREEN: Final = (40, 120)  # rows, columns of the pseudo terminal
TERM: Final = "xterm-256color"
COMMAND_TIMEOUT: Final = 180.0
PROMPT_TIMEOUT: Final = 120.0
SLOWER_RATIO: Final = 1.10
SLOWER_MS: Final = 100.0
SERVICE_START_TIMEOUT: Final = 15.0
REAL_SOCKET: Final = "/run/coi/host.sock"
PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h
STARTUP_MOST_MS: Final = 60.0
STATE_MIB: Final = 50
STATE_PIECE: Final = "10K"
"""The saved-state rows' directory: STATE_MIB MiB cut into 5,120 files of 10 KiB."""
RSS_GOAL_MB: Final = 60.0
POOL_SETTLE_SECONDS: Final = 120
POOLED_RUN_RATIO: Final = 0.34
POOLED_RUN_MOST_MS: Final = 400.0
POOLED_SHELL_MOST_MS: Final = 600.0
"""The goals of a session from the warm pool: `coi run` three times faster than the
floor and within 0.4 s, `coi shell` to its prompt within 0.6 s."""
BOOTED: Final = ("for _ in $(seq 300); do case $(systemctl is-system-running --wait "
                 "2>/dev/null) in running|degraded) exit 0;; esac; sleep 0.1; done; exit 1")
"""Until systemd finished booting (a bus to answer on first: right after the start
there is none), at most ~30 s."""
SAMPLER: Final = """
import os, signal, sys, time
root, peak, stop = sys.argv[1].encode(), 0, []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
while not stop:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            words = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
            if not (words[0].startswith(root) and b"-m" in words and
                    any(w.startswith(b"coi_") for w in words)):
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    time.sleep(0.02)
print(peak)
"""
"""The peak RSS sampler, a process of its own (the bench itself has no threads)."""


@dataclass(frozen=True)
class Column:
    """One column of the table: the floor (no checkout) or a checkout's coi."""

    key: str
    title: str
    checkout: Path | None = None
    socket: str = ""

    def coi(self) -> str:
        assert self.checkout is not None
        return str(self.checkout / "bin" / "coi")


@dataclass
class Row:
    """A row: what it measures, how many runs, and one run of a column (-> ms)."""

    label: str
    runs: int
    measure: Callable[[Column], float]
    goal: report.Goal = field(default_factory=report.Goal)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, key: str) -> float | None:
        cell = self.cell(key)
        return cell["median_ms"] if cell else None

    def met(self) -> bool | None:
        return self.goal.met(self.median("this"), self.median("floor"))

    def cell(self, key: str) -> dict[str, Any] | None:
        found = self.samples.get(key)
        if not found:
            return None
        return {"median_ms": round(statistics.median(found), 1),
                "max_ms": round(max(found), 1), "samples_ms": [round(s, 1) for s in found]}


class Terminal:
    """A program on a pseudo terminal of its own (its controlling terminal), whose
    output is read until a text appears."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, *,
                 shown: str) -> None:
        self.shown = shown
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *SCREEN, 0, 0))
        try:
            # The terminal becomes the child's controlling one (as a login's is), so
            # the programs in it see a real tty; one ioctl, and the bench has no threads.
            self.child = subprocess.Popen(
                list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self.seen = bytearray()

    def wait_for(self, text: bytes, timeout: float) -> None:
        """Read until `text` was printed; CommandFailed when the program ends first or
        `timeout` passes."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failure(f"no {text.decode()!r} within {timeout:g} s")
            if select.select([self.master], [], [], left)[0] and not self._read():
                raise self._failure(f"ended before {text.decode()!r} appeared")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float) -> None:
        """Read until the program ended (the terminal's other side closed); CommandFailed
        when it did not within `timeout` or failed."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.master], [], [], left)[0] and not self._read():
                code = self.child.wait(timeout=max(left, 1.0))
                if code != 0:
                    raise self._failure(f"exited {code}")
                return
        raise self._failure(f"did not end within {timeout:g} s")

    def close(self, keys: bytes = b"", timeout: float = 30.0) -> None:
        """Type `keys`, read until the program ends (at most `timeout`), else kill it."""
        with contextlib.suppress(OSError):
            os.write(self.master, keys)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.master], [], [], deadline - time.monotonic())[0] and \
                    not self._read():
                break
        with contextlib.suppress(ProcessLookupError):
            if self.child.poll() is None:
                os.killpg(self.child.pid, signal.SIGKILL)
        self.child.wait()
        os.close(self.master)

    def _read(self) -> bytes:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every holder of the other side closed it
            return b""
        self.seen += chunk
        return chunk

    def _failure(self, problem: str) -> CommandFailed:
        tail = " ".join(self.seen.decode(errors="replace").split())[-300:]
        return CommandFailed(f"{self.shown}: {problem}; it printed: {tail}")


class Bench:
    """The bench user, their workspace and container prefix, and one run of each row."""

    def __init__(self, user: fixtures_users.TestUser, prefix: str, client: Incus) -> None:
        self.user, self.prefix, self.client = user, prefix, client
        self.workspace = self.user.home / "workspace"
        self.workspace.mkdir(mode=0o755)
        os.chown(self.workspace, self.user.uid, self.user.gid)
        self.listed: list[str] = []
        self.state_name, self.session_id = "", ""
        self.floor_copy = self.user.home / "floor-state"
        self.failures: dict[str, int] = {}
        self.pool_size = 0  # the pool rows' COI_POOL_SIZE for this checkout's coi

    # -- running as the bench user ------------------------------------------------------

    def argv(self, *command: str) -> list[str]:
        return ["setpriv", "--reuid", str(self.user.uid), "--regid", str(self.user.gid),
                "--init-groups", *command]

    def env(self, column: Column) -> dict[str, str]:
        env = {**self.user.login_env(), "TERM": TERM}
        if column.checkout is not None:
            env.update(COI_DEFAULTS_IMAGE=IMAGE, COI_TOOL_NAME="dummy",
                       COI_CONTAINER_PREFIX=self.prefix, COI_HOST_SOCKET=column.socket,
                       COI_POOL_SIZE=str(self.pool_size))
        return env

    def run(self, column: Column, *command: str) -> str:
        """Run `command` as the bench user in the workspace; its stdout. CommandFailed,
        naming the column, when it exits non-zero."""
        shown = f"{column.title}: `{' '.join(command)}`"
        try:
            done = subprocess.run(self.argv(*command), env=self.env(column), cwd=self.workspace,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"{shown} took over {COMMAND_TIMEOUT:g} s") from None
        if done.returncode != 0:
            raise CommandFailed(f"{shown} exited {done.returncode}: "
                                f"{proc.last_line(done.stderr + done.stdout)}")
        return done.stdout

    def coi(self, column: Column, *args: str) -> str:
        return self.run(column, column.coi(), *args)

    def terminal(self, column: Column, *command: str) -> Terminal:
        return Terminal(self.argv(*command), self.env(column), self.workspace,
                        shown=f"{column.title}: `{' '.join(command)}`")

    def floor_name(self) -> str:
        return f"{self.prefix}floor"

    # -- the rows: one run of one column, in ms ------------------------------------------

    def run_true(self, column: Column, network: str = "restricted") -> float:
        start = time.perf_counter()
        if column.checkout is not None:
            self.coi(column, "run", "--network", network, "--", "true")
        else:
            name = self.floor_name()
            self.run(column, "incus", "create", IMAGE, name, "--profile", PROFILE)
            self.run(column, "incus", "start", name)
            self.run(column, "incus", "exec", name, "--", "true")
            self.run(column, "incus", "delete", "-f", name)
        return ms_since(start)

    def concurrent(self, column: Column, count: int) -> float:
        """`count` sessions (or floors) started at once in the one workspace: the wall
        time until the last ended; those that failed are counted, not raised."""
        if column.checkout is not None:
            commands = [[column.coi(), "run", "--", "true"]] * count
        else:
            commands = [["sh", "-c", f"incus create {IMAGE} {name} --profile {PROFILE} && "
                         f"incus start {name} && incus exec {name} -- true && "
                         f"incus delete -f {name}"]
                        for name in (f"{self.floor_name()}{n}" for n in range(count))]
        start = time.perf_counter()
        children = [subprocess.Popen(self.argv(*command), env=self.env(column),
                                     cwd=self.workspace, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for command in commands]
        failed = sum(child.wait(timeout=COMMAND_TIMEOUT * 2) != 0 for child in children)
        elapsed = ms_since(start)
        self.failures[column.key] = self.failures.get(column.key, 0) + failed
        self.end_sessions(column)
        return elapsed

    def shell_prompt(self, column: Column) -> float:
        start = time.perf_counter()
        if column.checkout is not None:
            term = self.terminal(column, column.coi(), "shell")
        else:
            name = self.floor_name()
            self.run(column, "incus", "create", IMAGE, name, "--profile", PROFILE)
            self.run(column, "incus", "start", name)
            term = self.terminal(column, "incus", "exec", "-t", name, "--",
                                 "sh", "-c", f"echo '{PROMPT.decode()}'")
        try:
            term.wait_for(PROMPT, PROMPT_TIMEOUT)
            elapsed = ms_since(start)
        finally:
            term.close(DETACH if column.checkout is not None else b"")
            self.end_sessions(column)
        return elapsed

    def poweroff(self, column: Column) -> float:
        """From `sudo poweroff` in a session's bash (the floor: `poweroff` by `incus
        exec` in a booted ephemeral container) until the container is gone."""
        if column.checkout is not None:
            term = self.terminal(column, column.coi(), "shell")
            try:
                term.wait_for(PROMPT, PROMPT_TIMEOUT)
                term.type(b"/exit\r")
                term.wait_for(b"code@", PROMPT_TIMEOUT)
                start = time.perf_counter()
                term.type(b"sudo poweroff\r")
                term.finish(COMMAND_TIMEOUT)
            finally:
                term.close()
        else:
            name = self.floor_name()
            self.run(column, "incus", "create", IMAGE, name, "--profile", PROFILE,
                     "--ephemeral")
            self.run(column, "incus", "start", name)
            self.run(column, "incus", "exec", name, "--", "sh", "-c", BOOTED)
            start = time.perf_counter()
            self.run(column, "incus", "exec", name, "--", "poweroff")
        self.wait_gone(column)
        elapsed = ms_since(start)
        self.end_sessions(column)
        return elapsed

    def wait_gone(self, column: Column) -> None:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while self.client.instances(self.prefix):
            if time.monotonic() > deadline:
                raise CommandFailed(f"{column.title}: the container was not gone within "
                                    f"{COMMAND_TIMEOUT:g} s of the poweroff")
            time.sleep(0.02)

    # -- the warm pool rows: this checkout with a pool of one, against the same floor ---

    def pooled(self, measure: Callable[[Column], float]) -> Callable[[Column], float]:
        """`measure` of a column; this checkout's claims from a warm pool of one, filled
        and settled (the last run's end and refill over) outside the timing."""
        def pooled_measure(column: Column) -> float:
            if column.checkout is not None:
                self.settle_pool(column)
            return measure(column)
        return pooled_measure

    def settle_pool(self, column: Column, *, alone: bool = True) -> None:
        """Until a `coi pool fill` ran to its end (none was under way in the background:
        the pool is full) and, when `alone`, nothing but the pool runs (the last run's
        end is over)."""
        deadline = time.monotonic() + POOL_SETTLE_SECONDS
        while time.monotonic() < deadline:
            done = subprocess.run(self.argv(column.coi(), "pool", "fill"), env=self.env(column),
                                  cwd=self.workspace, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                                  check=False)
            status = json.loads(self.coi(column, "pool", "status", "--format", "json"))
            if done.returncode == 0 and "under way" not in done.stderr and (
                    not alone or len(self.client.instances(self.prefix))
                    == len(status["containers"])):
                return
            time.sleep(0.3)
        raise CommandFailed(f"{column.title}: the warm pool did not settle within "
                            f"{POOL_SETTLE_SECONDS} s")

    def end_sessions(self, column: Column) -> None:
        """Outside the timing: the column ends its own session; nothing may be left (a
        refill of the pool is let finish first: a container half made cannot be ended)."""
        if column.checkout is not None and self.pool_size:
            self.settle_pool(column, alone=False)
        if column.checkout is not None:
            self.coi(column, "kill", "--all", "--force")
        for instance in self.client.instances(self.prefix):
            self.client.delete_instance_force(instance["name"])

    def make_listed(self, column: Column, count: int) -> None:
        """`count` stopped persistent containers of the workspace, made by `column`."""
        for slot in range(1, count + 1):
            self.coi(column, "run", "--persistent", "--slot", str(slot), "--", "true")
        self.coi(column, "shutdown", "--all", "--force", "--timeout", "0")
        found = {i["name"]: i["status"] for i in self.client.instances(self.prefix)}
        if len(found) != count or set(found.values()) != {"Stopped"}:
            raise CommandFailed(f"{column.title}: expected {count} stopped containers, "
                                f"found {found}")
        self.listed = sorted(found)

    # -- the saved-state rows: one persistent container holding the state -------------

    def make_state(self, column: Column) -> None:
        """A running persistent container of the workspace whose ~/.dummy holds the
        state (STATE_MIB), made by `column`."""
        script = (f"mkdir -p ~/.dummy/bench && head -c {STATE_MIB}M /dev/urandom | "
                  f"split -b {STATE_PIECE} -a 4 -d - ~/.dummy/bench/f")
        self.coi(column, "run", "--persistent", "--slot", "1", "--", "sh", "-c", script)
        [instance] = self.client.instances(self.prefix)
        self.state_name = instance["name"]
        if instance["status"] != "Running":
            self.client.set_state(self.state_name, "start")

    def save_state(self, column: Column) -> float:
        if column.checkout is not None:
            start = time.perf_counter()
            shown = self.coi(column, "session", "save", self.state_name, "--format", "json")
            elapsed = ms_since(start)
            self.session_id = json.loads(shown.splitlines()[-1])["id"]
            return elapsed
        self.run(column, "rm", "-rf", str(self.floor_copy))
        self.run(column, "mkdir", str(self.floor_copy))
        start = time.perf_counter()
        self.run(column, "sh", "-c", f"incus exec {self.state_name} -- tar -C /home/code "
                 f"-cf - .dummy | tar -x -C {self.floor_copy}")
        return ms_since(start)

    def restore_state(self, column: Column) -> float:
        start = time.perf_counter()
        if column.checkout is not None:
            self.coi(column, "session", "restore", self.session_id, self.state_name,
                     "--format", "json")
        else:
            self.run(column, "sh", "-c", f"tar -C {self.floor_copy} -cf - .dummy | incus "
                     f"exec {self.state_name} --user 1000 --group 1000 -- tar -x "
                     "--no-same-owner -C /home/code")
        return ms_since(start)

    def list_json(self, column: Column) -> float:
        start = time.perf_counter()
        if column.checkout is not None:
            shown = self.coi(column, "list", "--format", "json")
        else:
            shown = self.run(column, "incus", "list", "--format", "json", self.prefix)
        elapsed = ms_since(start)
        try:
            json.loads(shown)
        except ValueError:
            raise CommandFailed(f"{column.title}: the listing is not JSON") from None
        missing = [name for name in self.listed if name not in shown]
        if missing:
            raise CommandFailed(f"{column.title}: the listing lacks {', '.join(missing)}")
        return elapsed

    def start_up(self, column: Column, *args: str) -> float:
        start = time.perf_counter()
        if column.checkout is not None:
            self.coi(column, *args)
        else:
            self.run(column, str(ROOT / ".venv" / "bin" / "python"), "-c", "pass")
        return ms_since(start)


def measure_rows(work: Bench, columns: Sequence[Column], *, runs: int, list_runs: int,
                 concurrent: int, count: int) -> list[Row]:
    """Every row, measured in order: the sessions, start-up, the saved state (this
    checkout only), then the listing of `count` stopped containers."""
    startup = report.Goal(most_ms=STARTUP_MOST_MS)
    rows = [*(Row(f"`coi run -- true`, {network}", runs,
                  lambda c, n=network: work.run_true(c, n))
              for network in ("open", "restricted", "allowlist")),
            Row("`coi shell` to the prompt", runs, work.shell_prompt),
            Row("`sudo poweroff` in `coi shell` until the container is gone", runs,
                work.poweroff),
            Row(f"{concurrent} concurrent `coi run -- true` (all)", max(1, runs // 2),
                lambda c: work.concurrent(c, concurrent)),
            Row("`coi list --format json`, none", list_runs, work.list_json),
            Row("`coi version` (floor: python -c pass)", list_runs,
                lambda c: work.start_up(c, "version"), startup),
            Row("`coi --help` (floor: python -c pass)", list_runs,
                lambda c: work.start_up(c, "--help"), startup),
            Row(f"`coi list --format json`, {count} stopped", list_runs, work.list_json)]
    state_rows = [Row(f"`coi session save NAME`, {STATE_MIB} MiB in 5,120 files",
                      list_runs, work.save_state),
                  Row("`coi session restore ID NAME` of it", list_runs,
                      work.restore_state)]
    pool_rows = [Row("`coi run -- true`, restricted, warm pool of 1", runs,
                     work.pooled(work.run_true),
                     report.Goal(ratio=POOLED_RUN_RATIO, most_ms=POOLED_RUN_MOST_MS)),
                 Row("`coi shell` to the prompt, warm pool of 1", runs,
                     work.pooled(work.shell_prompt),
                     report.Goal(ratio=None, most_ms=POOLED_SHELL_MOST_MS))]
    rows[-1:-1] = [*state_rows, *pool_rows]
    for row in rows[:-5]:
        measure(row, columns)
    this = next(c for c in columns if c.key == "this")
    work.pool_size = 1
    for row in pool_rows:  # the baseline has no pool
        measure(row, [c for c in columns if c.key != "baseline"])
    work.pool_size = 0
    work.settle_pool(this)
    work.end_sessions(this)
    work.make_state(this)
    for row in state_rows:  # the baseline's coi-session may not read this one's keys
        measure(row, [c for c in columns if c.key != "baseline"])
    work.end_sessions(this)
    work.make_listed(this, count)
    measure(rows[-1], columns)
    return rows


def net_rows(path: Path) -> list[Row]:
    """The rows bench/net.py wrote: [{label, this: [ms...], floor: [ms...]}, ...]."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--net-rows {path}: unreadable: {error}") from None
    if not isinstance(found, list) or not all(
            isinstance(r, dict) and isinstance(r.get("label"), str) and all(
                isinstance(r.get(k), list) and r[k] and
                all(isinstance(v, int | float) for v in r[k]) for k in ("this", "floor"))
            for r in found):
        raise UsageError(f"--net-rows {path}: not the rows bench/net.py --rows writes")
    return [Row(r["label"], len(r["this"]), _measured_by_net_py,
                samples={"this": r["this"], "floor": r["floor"]}) for r in found]


def _measured_by_net_py(column: Column) -> float:
    raise AssertionError(f"{column.title}: a row of bench/net.py is not measured here")


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def measure(row: Row, columns: Sequence[Column]) -> None:
    """One unrecorded warm-up of each column, then `row.runs` interleaved rounds."""
    for column in columns:
        row.measure(column)
    for _ in range(row.runs):
        for column in columns:
            row.samples.setdefault(column.key, []).append(row.measure(column))


# -- host services and checkouts ---------------------------------------------------------


class Services:
    """One `coi-host serve` per checkout on a socket and nftables table of its own."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.children: list[subprocess.Popen[bytes]] = []
        self.folder = Path(tempfile.mkdtemp(prefix=f"coi-test-svc-bench{tag}-", dir="/tmp"))
        self.folder.chmod(0o755)  # the bench user reaches the sockets through it

    def start(self, checkout: Path, key: str) -> str:
        socket = self.folder / f"{key}.sock"
        log = self.folder / f"{key}.log"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("COI_")},
               "COI_NFT_TABLE": f"coi_test_bench{self.tag}_{key}",
               "COI_NET_STATE_DIR": str(self.folder / f"{key}-net-state")}
        with log.open("ab") as output:
            # It dies with the bench (SIGKILL included): a root service left running
            # would be a leftover no sweep looks for. One prctl, and no threads here.
            child = subprocess.Popen([str(checkout / "bin" / "coi-host"), "serve", "--socket",
                                      str(socket)], env=env, stdin=subprocess.DEVNULL,
                                     stdout=output, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.children.append(child)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        while not socket.is_socket():
            if child.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed(f"the host service of {checkout} did not start: "
                                    f"{proc.last_line(log.read_text())}")
            time.sleep(0.05)
        return str(socket)

    def stop(self) -> None:
        for child in self.children:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
            child.kill()
            child.wait()
        self.children.clear()


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def checked_checkout(path: str) -> Path:
    checkout = Path(path).resolve()
    if not (checkout / "bin" / "coi").is_file() or \
            not os.access(checkout / ".venv" / "bin" / "python", os.X_OK):
        raise UsageError(f"--baseline {path}: not a coi checkout with a venv",
                         hint=f"make one: git -C {ROOT} worktree add --detach DIR COMMIT; "
                              "make -C DIR venv")
    return checkout


def compile_checkout(checkout: Path) -> None:
    """Byte code on disk: the bench user cannot write it, and without it every start
    of theirs would recompile coi's modules."""
    subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-m", "compileall", "-q",
                    "lib", *(p.name for p in checkout.glob("coi-*"))],
                   cwd=checkout, check=False, capture_output=True)


# -- output ----------------------------------------------------------------------------


def slower(row: Row) -> str:
    """'AFTER ms against BEFORE ms' when this checkout's median exceeds the baseline's
    by both margins, else ''."""
    base, this = row.cell("baseline"), row.cell("this")
    if base is None or this is None:
        return ""
    before, after = base["median_ms"], this["median_ms"]
    if after > before * SLOWER_RATIO and after - before > SLOWER_MS:
        return f"{after:.0f} ms against {before:.0f} ms"
    return ""


VERDICT: Final = {True: "pass", False: "FAIL", None: "-"}


def render_table(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    lines = ["| row | " + " | ".join(c.title for c in columns) + " | ratio | goal | |",
             "|---" * (len(columns) + 4) + "|"]
    for row in rows:
        cells = []
        for column in columns:
            cell = row.cell(column.key)
            cells.append(f"{cell['median_ms']:.0f} / {cell['max_ms']:.0f}" if cell else "")
        found = report.ratio(row.median("this"), row.median("floor"))
        cells += [f"x{found:.2f}" if found is not None else "-", row.goal.text(),
                  VERDICT[row.met()]]
        lines.append(f"| {row.label} ({row.runs} runs) | " + " | ".join(cells) + " |")
    return "\n".join(["ms, median / max", "", *lines])


def records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [{"bench": "porcelain", "version": 1, "row": row.label, "runs": row.runs,
             "floor": row.cell("floor"), "baseline": row.cell("baseline"),
             "this": row.cell("this"), "slower": bool(slower(row)),
             "ratio": report.ratio(row.median("this"), row.median("floor")),
             "goal": row.goal.text(), "met": row.met()} for row in rows]


class PeakRss:
    """The SAMPLER process, over every process whose interpreter lies under `root` and
    runs a coi module (`python -S -m coi_slot ...`, as bin/_launch starts them)."""

    def __init__(self, root: str) -> None:
        self.child = subprocess.Popen([sys.executable, "-c", SAMPLER, root],
                                      stdout=subprocess.PIPE, text=True,
                                      preexec_fn=_die_with_parent)  # noqa: PLW1509

    def stop(self) -> float:
        """The largest peak seen, MB."""
        self.child.terminate()
        out, _ = self.child.communicate(timeout=10)
        return round(int(out.strip() or 0) / 1024, 1)


# -- the run -----------------------------------------------------------------------------


def positive(name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{name} must be a whole number of 1 or more, got {text!r}")
    return int(text)


def bench(args: Args) -> int:
    if os.geteuid() != 0:
        raise UsageError("bench/porcelain.py creates a test user: run it as root",
                         hint="sudo .venv/bin/python bench/porcelain.py")
    runs = positive("<runs>", args["<runs>"] or "5")
    list_runs = positive("--list-runs", args["--list-runs"])
    concurrent = positive("--concurrent", args["--concurrent"])
    count = positive("--containers", args["--containers"])
    if args["--format"] not in ("text", "json"):
        raise UsageError(f"--format must be text or json, got {args['--format']!r}")
    baseline = checked_checkout(args["--baseline"]) if args["--baseline"] else None
    extra_rows = net_rows(Path(args["--net-rows"])) if args["--net-rows"] else []
    checkouts = [(key, path) for key, path in (("baseline", baseline), ("this", ROOT)) if path]
    lock = sweep.RunLock()
    lock.share()
    tag = secrets.token_hex(2)  # the prefix coi-test-bench<4 hex>- stays within 20 characters
    client = Incus()
    services = Services(tag)
    user: fixtures_users.TestUser | None = None
    cleaned = False

    def clean_up() -> None:
        nonlocal cleaned
        if cleaned:
            return
        cleaned = True
        try:
            services.stop()
            if user is not None:
                fixtures_users.remove_user(user)
            # The scope ends with the prefix's '-': bench/net.py's coi-test-bench<6 hex>
            # names can start with this bench's 4 hex, and a concurrent one stays alone.
            sweep.sweep(client, scope=f"bench{tag}-")
            shutil.rmtree(services.folder, ignore_errors=True)
        finally:
            lock.release()

    atexit.register(clean_up)
    try:
        columns = []
        for key, checkout in checkouts:
            compile_checkout(checkout)
            socket = REAL_SOCKET if args["--real-service"] else services.start(checkout, key)
            columns.append(Column(key, f"coi ({key} checkout)", checkout, socket))
        columns.append(Column("floor", "raw incus floor"))
        user = fixtures_users.create_user(f"bench{tag}")
        work = Bench(user, f"{sweep.INSTANCE_PREFIX}bench{tag}-", client)
        sampler = PeakRss(str(ROOT))
        rows = measure_rows(work, columns, runs=runs, list_runs=list_runs,
                            concurrent=concurrent, count=count) + extra_rows
        peak = sampler.stop()
    finally:
        clean_up()
    return show(rows, [columns[-1], *columns[:-1]], Extra(peak, work.failures),
                as_json=args["--format"] == "json")


@dataclass(frozen=True)
class Extra:
    """What is not a timed row: the peak RSS of this checkout's processes (MB) and the
    failed runs of the concurrency row per column."""

    peak_mb: float
    failures: dict[str, int]

    def lines(self) -> list[str]:
        met = self.peak_mb < RSS_GOAL_MB
        failed = ", ".join(f"{key} {count}" for key, count in sorted(self.failures.items()))
        return [f"peak RSS of this checkout's processes: {self.peak_mb:g} MB (goal < "
                f"{RSS_GOAL_MB:g} MB: {VERDICT[met]})",
                f"failed runs in the concurrency row: {failed} (goal: none from coi: "
                f"{VERDICT[not self.failures.get('this')]})"]


def show(rows: Sequence[Row], columns: Sequence[Column], extra: Extra, *,
         as_json: bool) -> int:
    """Print the table (columns in this order) or the records, write results.json and
    the chart; 1 when a row got slower."""
    found = records(rows)
    report.write_results(ROOT / "bench" / "results.json", found, {
        **report.machine_facts(), "peak_rss_mb": extra.peak_mb,
        "concurrent_failures": extra.failures})
    report.ratio_chart(ROOT / "bench" / "ratios.svg",
                       [(row.label, record["ratio"]) for row, record in zip(rows, found,
                                                                          strict=True)])
    print(json.dumps(found, indent=2) if as_json else
          "\n".join([render_table(rows, columns), "", *extra.lines()]))
    verdicts = [(row.label, slower(row)) for row in rows]
    for label, verdict in verdicts:
        if verdict:
            print(f"porcelain.py: this checkout is slower than the baseline: {label}: "
                  f"{verdict}", file=sys.stderr)
    return 1 if any(verdict for _, verdict in verdicts) else 0


def main() -> None:
    run_main("porcelain.py", __doc__ or "", bench)


if __name__ == "__main__":
    main()
