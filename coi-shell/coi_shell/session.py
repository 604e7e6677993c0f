"""`coi shell`, `coi attach` and `coi run`: bring a container up and hand it the terminal.

Containers are created non-ephemeral in Incus terms, so the session can
still be saved after a `sudo poweroff` from inside; coi deletes them itself
afterwards unless they are persistent, always through `coi-slot end` (the one
owner of saving and deleting, end_session here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from coi_common import (
    config,
    incus,
    locks,
    naming,
    owners,
    plumbing,
    proc,
    progress,
    sessions,
    steps,
    tools,
)
from coi_common.entry import Args
from coi_common.errors import BadInput, CoiError, IncusError, NotFound, UsageError
from coi_common.protocol import make_record, read_record, write_record
from coi_shell import container, slotting

RUNNING, RESTARTED, CREATED, CLAIMED = "running", "restarted", "created", "claimed"
"""What ensure_container found or did."""
ATTACH_SETTLE_SECONDS = 30.0
DOWN = ("Stopped", "Gone")
"""States (_status) of a container whose session is over: stopped, or ended and deleted
by another coi command already."""
ENDED = ({"coi": 1, "kind": "container_action", "action": "end", "ok": True, "saved": True,
          "deleted": True},)
"""What a --dry-run assumes `coi-slot end` answers: saved, then deleted."""
DEFAULT_TERM = "xterm-256color"
BOOT_SECONDS = 60
KILLED = 128 + 9
# systemd mounts a tmpfs over /tmp and cleans it during early boot: a tmux
# server started before that loses its socket. sysinit.target covers both and
# does not wait for the network (~0.3-0.8 s after start). `systemctl start` of the
# target joins the boot's own start job and returns when it is reached: one
# systemctl per wait, where polling `is-active` ran one every 0.1 s in every booting
# container (ten containers booting at once spent most of two cores on it). It is
# tried again only while systemd does not answer yet, in the first moments.
WAIT_FOR_BOOT = ("command -v systemctl >/dev/null || exit 0; i=0; "
                 "until systemctl start sysinit.target 2>/dev/null; do "
                 f"i=$((i + 1)); [ $i -ge {BOOT_SECONDS * 20} ] && exit 1; sleep 0.05; done")


@dataclass(frozen=True)
class Context:
    """The effective config, the Incus client, the slot record and the tool."""

    settings: config.Config
    client: incus.Incus
    record: sessions.SlotRecord
    tool: tools.Tool

    @property
    def resume_id(self) -> str:
        """--resume=ID: the session asked for by id (restored even into a reused one)."""
        return "" if self.record.resume in ("", sessions.RESUME_LATEST) else self.record.resume


# -- building the context ---------------------------------------------------------------


def slot_record(argv: list[str], command: list[str], *, record_on_stdin: bool,
                record_file: str | None = None,
                early: plumbing.Child | None = None) -> sessions.SlotRecord:
    """The session's slot record: from --record FILE, or on stdin (coi-slot next |
    coi-shell), else the one `coi-slot next FLAGS` prints (it checks the flags and
    reserves the slot; `early`: the one slotting.early_next started)."""
    flags = slotting.slot_flags(argv, command)
    if record_file is not None or (record_on_stdin and slotting.stdin_is_data()):
        given = _without_record_flag(flags)
        if given:
            raise UsageError(f"{given[0]}: with a slot record the record says everything",
                             hint="give the flags to coi-slot next instead")
        return _record_from_file(record_file or "-")
    found = (early or slotting.next_child(flags)).finish()
    if len(found) != 1:
        raise CoiError(f"coi-slot next printed {len(found)} slot records, not one")
    return sessions.SlotRecord.from_record(found[0])


def _without_record_flag(flags: list[str]) -> list[str]:
    if "--record" in flags:
        at = flags.index("--record")
        return flags[:at] + flags[at + 2:]
    return [flag for flag in flags if not flag.startswith("--record=")]


def _record_from_file(path: str) -> sessions.SlotRecord:
    if path == "-":
        return sessions.SlotRecord.from_record(read_record("slot"))
    try:
        with open(path, encoding="utf-8") as source:
            return sessions.SlotRecord.from_record(read_record("slot", source))
    except OSError as exc:
        raise BadInput(f"--record {path}: {exc.strerror}") from None


def context_from_args(args: Args, argv: list[str], *, record_on_stdin: bool,
                      early: plumbing.Child | None = None) -> Context:
    """The slot record (reserved) and what it takes: config, tool, Incus client."""
    record = slot_record(argv, list(args.get("<command>") or []),
                         record_on_stdin=record_on_stdin, record_file=args.get("--record"),
                         early=early)
    settings = config.load(record.workspace, profile=record.config_profile or None)
    tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
    return Context(settings, incus.connect(settings), record, tool)


# -- the container ----------------------------------------------------------------------


def ensure_container(ctx: Context, started: Callable[[bool], None] = lambda _reused: None
                     ) -> str:
    """Make the slot's container run; RUNNING when it was (attach to it), RESTARTED for
    a stopped persistent one started again, CREATED for a new one, CLAIMED for a warm
    pool's that coi-slot next claimed for this session.

    Everything that can refuse (image, id map, network privilege) is checked
    before a container is created; a persistent container that is stopped is
    started again as it is, with whatever was installed in it. `started(reused)`
    runs once it was started, while it boots (the restore of its home starts then).
    """
    name, client = ctx.record.container, ctx.client
    instance = _instance_of(client, name)
    if instance is not None:
        _check_ours(instance, ctx.record.workspace, _origin(ctx))
        if ctx.record.pooled:
            return _claimed(ctx, instance, started)
        if instance.get("status") == "Running":
            return RUNNING
        if sessions.is_persistent(instance):
            idmap = preflight(ctx)
            steps.starting(name, steps.AGAIN)
            sender = None
            try:
                with progress.waiting(f"starting persistent {name}"):
                    _start(ctx, idmap, lambda _view: None, sessions.has_view(instance))
                    sender = _workspace_sender(ctx)
                    started(True)
                    _wait_for_boot(ctx)
                _workspace_sent(ctx, sender, abandoning=True)
            except BaseException:
                if sender is not None:
                    sender.abandon()
                raise
            return RESTARTED
        end_session(ctx)  # a stopped ephemeral leftover: its session saved, then gone
    sender = None
    try:
        _create(ctx)
        sender = _workspace_sender(ctx)
        started(False)
        with progress.waiting(f"waiting for {name} to boot"):
            _wait_for_boot(ctx)
        _workspace_sent(ctx, sender)
    except BaseException:
        if sender is not None:
            sender.abandon()
        # Ours, just made and never used, or not made at all: gone, its slot free again.
        with contextlib.suppress(CoiError):
            end_session(ctx, "--no-save")
        raise
    return CREATED


def _claimed(ctx: Context, instance: Mapping[str, Any],
             started: Callable[[bool], None]) -> str:
    """A warm pool's container, claimed by coi-slot next: made, started and booted for
    this workspace already; only the home is left to restore."""
    if instance.get("status") != "Running":
        with contextlib.suppress(CoiError):
            end_session(ctx, "--no-save")
        raise CoiError(f"the pooled container {ctx.record.container} stopped before the "
                       "session could start in it; it was removed", hint="try again")
    steps.starting(ctx.record.container, steps.POOLED)
    started(False)
    return CLAIMED


def end_session(ctx: Context, *flags: str, child: plumbing.Child | None = None
                ) -> dict[str, Any]:
    """`coi-slot end` of this session's container (given the slot record, so its slot's
    reservation goes too): the one owner of saving and deleting. Its container_action
    record; a failure (a save that failed: the container is kept) raises. `child`: a
    `coi-slot end` started earlier (ender)."""
    found = (child or ender(*flags)).finish(ctx.record.to_record())
    if len(found) != 1:
        raise CoiError(f"coi-slot end printed {len(found)} results, not one")
    return found[0]


def _instance_of(client: incus.Incus, name: str) -> dict[str, Any] | None:
    try:
        return client.instance_config(name)
    except NotFound:
        return None


def _wait_for_boot(ctx: Context) -> None:
    """Until sysinit.target is reached. Early in a boot, systemd may SIGKILL the waiting
    shell (exit 137, seen about once in 15 starts here); the wait is harmless to
    repeat, so it is, until BOOT_SECONDS are up."""
    deadline = time.monotonic() + BOOT_SECONDS
    spec = incus.ExecSpec(ctx.record.container, ("sh", "-c", WAIT_FOR_BOOT))
    while True:
        done = ctx.client.exec_capture(spec, timeout=BOOT_SECONDS + 10)
        if done.returncode != KILLED or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not done.ok:
        raise CoiError(f"{ctx.record.container} did not finish booting within "
                       f"{BOOT_SECONDS} s (exit {done.returncode}: "
                       f"{proc.last_line(done.stderr) or 'no output'})")


def _check_ours(instance: dict[str, Any], workspace: str, origin: str) -> None:
    keys = instance.get("config") or {}
    if keys.get(f"{sessions.KEY}workspace") != workspace or \
            keys.get(f"{sessions.KEY}origin", "") != origin:
        raise CoiError(f"container {instance['name']} exists but is not a coi session of "
                       f"{workspace}" + (" on this host" if origin else ""),
                       hint="pick another slot or prefix")


def _origin(ctx: Context) -> str:
    """user.coi.origin of this host's containers: on a remote only."""
    return sessions.origin_id() if ctx.client.remote is not None else ""


def _workspace_sender(ctx: Context) -> plumbing.Child | None:
    """On a remote, `coi-session sync push` given the slot record as soon as the
    container started: the workspace is copied in while it boots (its /workspace is on
    the root file system, which booting leaves alone, as for the home's restore), all
    of it into a new container, the changes since the last sync into one started
    again. None for a container of this machine (its workspace is mounted)."""
    if ctx.client.remote is None:
        return None
    sender = plumbing.Child("coi-session", ["sync", "push"], kind="sync")
    sender.give(ctx.record.to_record())
    return sender


def _workspace_sent(ctx: Context, sender: plumbing.Child | None, *,
                    abandoning: bool = False) -> None:
    """Wait for _workspace_sender's copy, before the tool starts. A failure ends a new
    container (nothing of it was used) and stops a persistent one (`abandoning`)."""
    if sender is None:
        return
    try:
        with progress.waiting(f"copying the workspace into {ctx.record.container}"):
            [found] = sender.finish()
    except CoiError as exc:
        if abandoning:
            raise abandon(ctx, f"could not copy the workspace: {exc.one_line()}") from None
        raise
    print(f"coi: {found.get('message')}", file=sys.stderr)


def preflight(ctx: Context) -> container.IdMap | None:
    """What must hold before a container is created (or started again): Incus may map
    the user's ids, and this user can have network rules applied. (A missing image
    is the create request's own refusal, before anything exists.) Returns the id map."""
    record = ctx.record
    if ctx.client.remote is not None:
        return None  # nothing of this host is mounted there; its coi keeps the egress
    idmap = container.session_idmap(record.workspace)
    container.ensure_idmap(idmap)
    if record.network != "open" and os.geteuid() != 0:
        from coi_common import hostservice  # noqa: PLC0415

        hostservice.call("ping", timeout=5)
    return idmap


def _create(ctx: Context) -> None:
    # coi-net apply first of all: its start-up (~70-130 ms) is what the container, once
    # created (~80 ms), would wait for.
    applier = container.network_child(ctx.record)
    try:
        _create_with(ctx, applier)
    except BaseException:
        if applier is not None:
            applier.abandon()
        raise


def _create_with(ctx: Context, applier: plumbing.Child | None) -> None:
    idmap = preflight(ctx)
    record = dataclasses.replace(ctx.record,
                                 environment={**ctx.tool.env, **ctx.record.environment})

    # Every host path is checked before the view makes anything in the workspace. On a
    # remote nothing is mounted: the workspace is copied in while it boots.
    remote = ctx.client.remote is not None
    devices = {} if remote else container.container_devices(record, sessions.invoking_home())

    def create(viewed: container.Viewed) -> None:
        steps.starting(record.container, steps.NEW, record.image)
        try:
            # Created stopped: the egress rules go in before its first packet.
            with progress.waiting(f"creating {record.container} from image {record.image} "
                                  "(the first container of a new image takes longest)"):
                ctx.client.create_instance(
                    record.container, record.image, profiles=[record.profile],
                    config={**container.container_config(
                        record, idmap, owner=sessions.invoking_ids()[0],
                        allow_setuid=ctx.settings.get("security.allow_setuid"),
                        coverage=viewed.coverage, origin=_origin(ctx)),
                        **container.limits_config(record.limits)},
                    devices=container.through_view(devices, viewed.view))
        except NotFound as exc:
            remote = ctx.client.remote
            raise NotFound(exc.message, hint=f"copy it there: incus image copy {record.image} "
                           f"{remote.name}: --alias {record.image} --mode relay" if remote
                           else "build it with 'coi build'") from None
        container.apply_network(record, applier)

    _start(ctx, idmap, create, viewed=not remote)


def _start(ctx: Context, idmap: container.IdMap | None,
           before: Callable[[container.Viewed], None], viewed: bool = True) -> None:
    """Start the container on a fresh view of the workspace (`before` runs first, with
    the view: creating the container); the view leaves the host once it started.
    `viewed` False: a container made before views mounts the workspace itself."""
    with container.workspace_view(ctx.record, ctx.settings, idmap, wanted=viewed) as made:
        before(made)
        ctx.client.set_state(ctx.record.container, "start")
    if made.view is not None and not ctx.record.pool:
        print(f"coi: {made.view.summary()}", file=sys.stderr)


def abandon(ctx: Context, reason: str) -> CoiError:
    """A session whose tool could not be started is not left half up: an ephemeral
    container is removed (nothing of it was used yet), a persistent one stopped.
    Returns the error to raise."""
    name = ctx.record.container
    if sessions.is_persistent(ctx.client.instance_config(name)):
        with contextlib.suppress(CoiError):
            ctx.client.set_state(name, "stop", force=True)
        return CoiError(f"{reason}; {name} was stopped (persistent: kept)",
                        hint=f"start it again with {_shell_command(ctx.record)}")
    with contextlib.suppress(CoiError):
        end_session(ctx, "--no-save")
    return CoiError(f"{reason}; {name} was removed")


def _shell_command(record: sessions.SlotRecord) -> str:
    where = "" if record.workspace == naming.canonical_workspace(".") else \
        f" --workspace {shlex.quote(record.workspace)}"
    return f"'coi shell --slot {record.slot} --persistent{where}'"


# -- tmux inside ------------------------------------------------------------------------


def _exec_quiet(ctx: Context, command: list[str]) -> proc.Result:
    spec = container.as_code(ctx.record.container, command, tty=False,
                            env=container.session_env(DEFAULT_TERM))
    return ctx.client.exec_capture(spec, timeout=30)


def has_tmux_session(ctx: Context) -> bool:
    return _exec_quiet(ctx, ["tmux", "has-session", "-t", sessions.TMUX_SESSION]).ok


TMUX_BOOTSTRAP = ('tmux has-session -t "$1" 2>/dev/null && exit 0; '
                  'tmux new-session -d -s "$1" -x 200 -y 50 -c "$2" bash -l || exit 3; '
                  'tmux send-keys -t "$1" -l "$3" && tmux send-keys -t "$1" Enter || exit 4')
"""One exec instead of four: the session if there is none, the tool typed into its bash
(so the user lands in bash when the tool exits). Exit 3: tmux did not start; 4: typing."""


def ensure_tmux(ctx: Context, *, resume: bool = False) -> None:
    """A tmux session running bash in /workspace, with the tool started in it."""
    command = shlex.join(ctx.tool.command(resume=resume))
    done = _exec_quiet(ctx, ["sh", "-c", TMUX_BOOTSTRAP, "sh", sessions.TMUX_SESSION,
                             sessions.WORKSPACE_PATH, command])
    if not done.ok:
        what = ctx.tool.name if done.returncode == 4 else "tmux"
        raise abandon(ctx, f"could not start {what} in {ctx.record.container}: "
                      f"{proc.last_line(done.stderr) or 'exit ' + str(done.returncode)}")


def open_terminal() -> IO[bytes] | None:
    """None when our own stdin is the terminal; else /dev/tty (stdin carried a record).
    Checked first of all, so a script gets its answer before anything is created."""
    if sys.stdin.isatty():
        return None
    try:
        # Unbuffered binary: a text or buffered "r+" stream wants a seekable file.
        return open("/dev/tty", "rb+", buffering=0)
    except OSError:
        raise UsageError("coi shell needs a terminal", hint="use 'coi run -- CMD' from "
                         "scripts") from None


def hand_terminal_to(ctx: Context, command: list[str], terminal: IO[bytes] | None) -> int:
    spec = container.as_code(ctx.record.container, command, tty=True,
                            env=container.session_env(os.environ.get("TERM") or DEFAULT_TERM))
    return ctx.client.exec_handover(spec, terminal=terminal)


def after_terminal(ctx: Context, exit_code: int) -> int:
    """Poweroff inside ends the session (save, delete unless persistent); else say how
    to come back. Returns the exit status for the command: the terminal's, or 0
    for a session that ended (here or by another coi command), or 1 when its save
    failed.

    The end is `coi-slot end --if-down`: under the container's ending lock it waits
    (up to ATTACH_SETTLE_SECONDS) for the stop, then ends the session only if the
    container is down. A `coi shutdown` ending it right now (its save even starts it
    for a moment) holds that lock: waiting for it, the end then finds the container
    gone, or stopped with its session saved, and does nothing twice."""
    name = ctx.record.container
    if not _container_stopping(ctx):
        return _still_running(name, exit_code)
    try:
        result = end_session(ctx, "--if-down", "--wait", str(int(ATTACH_SETTLE_SECONDS)))
    except CoiError as exc:
        print(f"coi: {exc.one_line()}; 'coi list' shows what became of {name}",
              file=sys.stderr)
        return 1
    if result.get("running"):
        return _still_running(name, exit_code)
    steps.ended(name, deleted=bool(result.get("deleted")))
    return 0


def _still_running(name: str, exit_code: int) -> int:
    print(f"coi: {name} is still running: 'coi attach {name}' to return, "
          f"'coi shutdown {name}' to end it", file=sys.stderr)
    return exit_code


def _status(ctx: Context) -> str:
    try:
        return ctx.client.status(ctx.record.container)
    except NotFound:
        return "Gone"
    except IncusError:
        return "Stopping"  # Incus cannot read the state of a container halfway down


def _container_stopping(ctx: Context) -> bool:
    """Whether the terminal ended because the container is going down (poweroff
    inside), not because the user detached or left a shell with some status."""
    if _status(ctx) != "Running":
        return True
    if has_tmux_session(ctx):
        return False  # detached
    state = _exec_quiet(ctx, ["systemctl", "is-system-running"]).stdout.strip()
    return state in ("stopping", "")


# -- saved sessions: resume and credentials ----------------------------------------------


def resume_target(ctx: Context) -> dict[str, Any] | None:
    """The saved session --resume[=ID] asks for (`coi-session restore --check`): only
    ever one of this workspace and tool. None without --resume, or when this
    workspace has none (then the tool starts fresh, and coi-session says so). Asked
    before the container is made, so a refusal leaves nothing but a free slot."""
    if not ctx.record.resume:
        return None
    try:
        # A session of this workspace still ending in the background is saved first.
        locks.wait_for_endings(ctx.client, [i["name"] for i in ctx.client.instances(
            f"{naming.container_prefix()}{naming.workspace_hash(ctx.record.workspace)}-")])
        found = plumbing.call("coi-session", ["restore", "--check"],
                              record=ctx.record.to_record(), kind="session",
                              dry_run=plumbing.READS)
    except BaseException:
        if _instance_of(ctx.client, ctx.record.container) is None:  # only its slot to free
            with contextlib.suppress(CoiError):
                end_session(ctx, "--no-save")
        raise
    return found[0] if found else None


def ready_and_home(ctx: Context, wanted: Mapping[str, Any] | None, *,
                   then: Callable[[], None] = lambda: None) -> tuple[str, bool]:
    """ensure_container, then prepare_home unless it was running already: (its state,
    whether the tool resumes). `coi-session restore` starts, with its record, as soon
    as the container started: the home is restored while the container boots (its
    home is on the root file system, which booting leaves alone; only /tmp is remade,
    and the tool's tmux comes later), and the boot leaves its start-up time enough,
    while until then the CPU is coi-net apply's. `then` runs next, while it boots."""
    restorers: list[plumbing.Child] = []

    def started(reused: bool) -> None:
        restorers.append(plumbing.Child("coi-session", ["restore"], kind="session_restored"))
        restorers[0].give(_restore_record(ctx, _restored(ctx, wanted, reused)))
        then()

    try:
        state = ensure_container(ctx, started)
    except BaseException:
        for restorer in restorers:
            restorer.abandon()
        raise
    if state == RUNNING:
        return state, False
    return state, prepare_home(ctx, wanted, restorers[0], reused=state == RESTARTED)


def _restored(ctx: Context, wanted: Mapping[str, Any] | None, reused: bool
              ) -> Mapping[str, Any] | None:
    """The saved session to restore: `wanted`, except into a persistent container
    started again (`reused`), which keeps its own conversation unless an id was asked."""
    return None if reused and not ctx.resume_id else wanted


def _restore_record(ctx: Context, session: Mapping[str, Any] | None) -> dict[str, Any]:
    """`coi-session restore`'s input: the slot record naming the session (none: only
    the credentials)."""
    session_id = str(session["id"]) if session is not None else ""
    return dataclasses.replace(ctx.record, resume=session_id).to_record()


def ender(*flags: str) -> plumbing.Child:
    """`coi-slot end FLAGS`, started (end_session finishes it): `coi run` starts it
    before its command, so its start-up and its children's are over when it ends."""
    return plumbing.Child("coi-slot", ["end", *flags], kind="container_action",
                          dry_run=ENDED)


def prepare_home(ctx: Context, wanted: Mapping[str, Any] | None, restorer: plumbing.Child,
                 *, reused: bool = False) -> bool:
    """Before the tool starts in a container just started: `coi-session restore` of the
    session `wanted` (resume_target; None: credentials only), which also copies fresh
    credentials in and merges the settings file. True when the tool resumes.

    A persistent container started again (`reused`) keeps its own conversation:
    --resume then only starts the tool with its resume arguments, unless a
    session id was asked for. A failed restore abandons the container (removed
    when ephemeral, stopped when persistent); failing to copy credentials only
    warns, since the tool can still be logged into inside.
    """
    name = ctx.record.container
    resumed = wanted is not None
    restored = _restored(ctx, wanted, reused)
    if wanted is not None and restored is None:
        print(f"coi: resuming the conversation kept in persistent {name}", file=sys.stderr)
    session_id = str(restored["id"]) if restored is not None else ""
    try:
        with progress.waiting(f"restoring session {session_id} into {name}" if session_id
                              else f"copying credentials into {name}"):
            found = restorer.finish()  # its record went with its start
    except CoiError as exc:
        if not session_id:
            print(f"coi: could not copy credentials into {name}: {exc.one_line()}",
                  file=sys.stderr)
            return resumed
        raise abandon(ctx, f"could not restore session {session_id}: {exc.one_line()}") \
            from None
    if session_id and found:
        print(f"coi: {found[0].get('message')}", file=sys.stderr)
    return resumed


# -- the commands -------------------------------------------------------------------------


def shell(args: Args, argv: list[str], early: plumbing.Child | None = None) -> int:
    """Start or reattach to the tool's tmux session and hand the terminal over; exit
    with what the terminal session ended with."""
    if args.get("--session") is not None:  # refused before even the terminal is opened
        naming.validate_session_id(args["--session"])
    # Then a script without a terminal is told at once (a dry run hands none over).
    terminal = None if args.get("--dry-run") else open_terminal()
    try:
        ctx = context_from_args(args, argv, record_on_stdin=True, early=early)
        wanted = resume_target(ctx)
        state, resumed = ready_and_home(ctx, wanted)
        if state == RUNNING:
            print(f"coi: attaching to running {ctx.record.container}"
                  + ("; --resume does not apply to a running session" if wanted else ""),
                  file=sys.stderr)
        ensure_tmux(ctx, resume=resumed)
        refill_pool(ctx)
        code = hand_terminal_to(ctx, ["tmux", "attach-session", "-t", sessions.TMUX_SESSION],
                                terminal)
        return after_terminal(ctx, code)
    finally:
        if terminal is not None:
            terminal.close()


def run_command(args: Args, argv: list[str], early: plumbing.Child | None = None) -> int:
    """One command in the slot's container; cleaned up whatever happens. The container
    is deleted afterwards unless it is persistent (its own setting decides)."""
    ctx = context_from_args(args, argv, record_on_stdin=False, early=early)
    wanted = resume_target(ctx)
    enders: list[plumbing.Child] = []  # coi-slot end, started while the container boots
    flags = ["--background"] if ends_in_background(ctx) else []
    try:
        ready_and_home(ctx, wanted, then=lambda: enders.append(ender(*flags)))
    except BaseException:
        for child in enders:
            child.abandon()
        raise
    ending = enders[0] if enders else None
    try:
        ending = ending or ender(*flags)
        spec = container.as_code(ctx.record.container, list(args["<command>"]), tty=False,
                                env=container.session_env(os.environ.get("TERM")))
        return ctx.client.exec_handover(spec)
    finally:
        try:
            result = end_session(ctx, child=ending)
        except CoiError as exc:  # the command's own status stays the answer
            print(f"coi: {exc.one_line()}", file=sys.stderr)
        else:
            steps.ended(ctx.record.container, deleted=bool(result.get("deleted")),
                        background=bool(flags))
        refill_pool(ctx)


def ends_in_background(ctx: Context) -> bool:
    """With a warm pool (pool.size), an ephemeral `coi run` answers once its command is
    done: the save, the delete and the removal of the rules go on behind it
    (pool.end_in_background; coi-slot end --background)."""
    return not ctx.record.persistent and bool(ctx.settings.get("pool.size")) \
        and bool(ctx.settings.get("pool.end_in_background"))


def refill_pool(ctx: Context) -> None:
    """With a warm pool configured (pool.size), `coi pool fill` of this workspace in the
    background, after a session that could have claimed from it: it makes what was
    claimed again, off this command's time. Its output goes to logs_dir/pool.log."""
    if ctx.record.persistent or not ctx.settings.get("pool.size"):
        return
    from coi_common import executables, plan  # noqa: PLC0415

    argv = [executables.find_executable("coi-slot") or "coi-slot", "pool", "fill",
            "--workspace", ctx.record.workspace]
    if plan.step("spawn", argv):
        return
    logs = ctx.settings.path("paths.logs_dir")
    with contextlib.suppress(OSError):  # no refill: the next session makes its own
        os.makedirs(logs, mode=0o700, exist_ok=True)
        proc.spawn_detached(argv, os.path.join(logs, "pool.log"))


def warm() -> int:
    """`coi-shell warm`: make the warm pool container of the `coi-slot next --pool`
    record on stdin (created, its rules in, started, booted: what a session would do
    before its home), and leave it running for a session to claim."""
    record = _record_from_file("-")
    if not record.pool:
        raise UsageError("coi-shell warm takes the slot record of 'coi-slot next --pool'",
                         hint="coi pool fill makes warm containers")
    settings = config.load(record.workspace, profile=record.config_profile or None)
    tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
    ctx = Context(settings, incus.connect(settings), record, tool)
    if _instance_of(ctx.client, record.container) is not None:
        raise CoiError(f"{record.container} exists already: a warm pool container is "
                       "always a new one")
    ensure_container(ctx)
    write_record(make_record("container_action", name=record.container, action="warm",
                             ok=True))
    return 0


def attach(args: Args) -> int:
    """Reattach to a running session of this workspace (or the named container)."""
    # The flags are checked before Incus is asked.
    if args["<name>"] is not None:
        naming.validate_container_name(args["<name>"])
    if args["--slot"] is not None:
        naming.validate_slot(args["--slot"], naming.SLOT_CEILING)
    settings = config.load(naming.canonical_workspace(args["--workspace"]), lenient=True)
    client = incus.connect(settings)
    instance = _pick_attach_target(client, args)
    record = _record_of(instance, settings)
    tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
    ctx = Context(settings, client, record, tool)
    terminal = open_terminal()
    try:
        if args["--bash"]:
            code = hand_terminal_to(ctx, ["bash", "-l"], terminal)
        else:
            ensure_tmux(ctx)
            code = hand_terminal_to(ctx, ["tmux", "attach-session", "-t",
                                          sessions.TMUX_SESSION], terminal)
        return after_terminal(ctx, code)
    finally:
        if terminal is not None:
            terminal.close()


def _pick_attach_target(client: incus.Incus, args: Args) -> dict[str, Any]:
    prefix = naming.container_prefix()
    mine = owners.visible(sessions.coi_containers(client, prefix),
                          uid=owners.caller_uid(), all_users=False)
    ours = {i["name"]: i for i in mine}
    if args["<name>"] is not None:
        name = naming.validate_container_name(args["<name>"])
        if name not in ours:
            if client.instance_exists(name):
                raise NotFound(f"{name} is not one of your coi sessions",
                               hint="coi list shows yours")
            raise NotFound(f"no container {name}", hint="coi list shows the sessions")
        candidates = [ours[name]]
    else:
        workspace = naming.canonical_workspace(args["--workspace"])
        candidates = [i for i in ours.values()
                      if i["config"].get(f"{sessions.KEY}workspace") == workspace]
        if args["--slot"] is not None:
            slot = str(naming.validate_slot(args["--slot"], naming.SLOT_CEILING))
            candidates = [i for i in candidates if i["config"].get(f"{sessions.KEY}slot") == slot]
        elif not candidates and args["--workspace"] == ".":
            # Outside any workspace of yours: the running sessions of every one of them.
            candidates = [i for i in ours.values() if i.get("status") == "Running"]
        if not candidates:
            raise NotFound(f"no coi session for {workspace}", hint="start one: coi shell")
    running = [i for i in candidates if i.get("status") == "Running"]
    if not running:
        stopped = _record_of(candidates[0], None)
        raise CoiError(f"{candidates[0]['name']} is stopped",
                       hint=f"start it again with {_shell_command(stopped)}")
    if len(running) > 1:
        return _choose(running)
    return running[0]


def _choose(running: list[dict[str, Any]]) -> dict[str, Any]:
    names = [i["name"] for i in running]
    if not sys.stdin.isatty():
        raise BadInput(f"several sessions run for this workspace: {', '.join(names)}",
                       hint="name one: coi attach NAME, or --slot N")
    for number, name in enumerate(names, 1):
        print(f"  {number}) {name}", file=sys.stderr)
    answer = input("attach to which? ").strip()
    if not answer.isdigit() or not 1 <= int(answer) <= len(names):
        raise BadInput(f"no session number {answer!r}")
    return running[int(answer) - 1]


def _record_of(instance: dict[str, Any],
               settings: config.Config | None) -> sessions.SlotRecord:
    keys = sessions.SessionContainer.from_instance(instance)
    if keys is None:  # coi_containers lists only containers whose keys parse
        raise CoiError(f"{instance['name']} is not a coi session container")
    return sessions.SlotRecord(
        workspace=keys.workspace, slot=keys.slot, container=instance["name"],
        persistent=keys.persistent, image=keys.image,
        profile=settings.get("incus.profile") if settings else "", tool=keys.tool,
        network=keys.network)
