"""`coi shell`, `coi attach` and `coi run`: bring a container up and hand it the terminal.

Containers are created non-ephemeral in Incus terms, so the session can
still be saved after a `sudo poweroff` from inside; coi deletes them itself
afterwards unless they are persistent, always through
`sessions.end_session` (the save hook).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import stat
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
    proc,
    progress,
    saved_sessions,
    sessions,
    slots,
    tools,
)
from coi_common.entry import Args
from coi_common.errors import BadInput, CoiError, IncusError, NotFound, UsageError
from coi_common.protocol import read_record
from coi_shell import container

RUNNING, RESTARTED, CREATED = "running", "restarted", "created"
"""What ensure_container found or did."""
ATTACH_SETTLE_SECONDS = 30.0
DOWN = ("Stopped", "Gone")
"""States (_status) of a container whose session is over: stopped, or ended and deleted
by another coi command already."""
DEFAULT_TERM = "xterm-256color"
BOOT_SECONDS = 60
KILLED = 128 + 9
# systemd mounts a tmpfs over /tmp and cleans it during early boot: a tmux
# server started before that loses its socket. sysinit.target covers both and
# does not wait for the network (~0.3-0.8 s after start).
WAIT_FOR_BOOT = (f"for i in $(seq {BOOT_SECONDS * 10}); do "
                 "systemctl is-active --quiet sysinit.target 2>/dev/null && exit 0; "
                 "sleep 0.1; done; command -v systemctl >/dev/null && exit 1 || exit 0")


@dataclass(frozen=True)
class Context:
    """The effective config, the Incus client, the slot record and the tool."""

    settings: config.Config
    client: incus.Incus
    record: sessions.SlotRecord
    tool: tools.Tool
    resume_id: str = ""
    """--resume=ID: the session asked for by id (restored even into a reused container)."""
    limits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Incus limits.* keys for a container this session creates (container.limits_config)."""
    mask: bool = True
    """Secret files of the workspace appear empty inside (--no-mask: off)."""
    mount_flags: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    """allow_home / force for container.container_devices (--allow-home, --force)."""


# -- building the context ---------------------------------------------------------------


def _stdin_is_data() -> bool:
    """A pipe or file on stdin carries a slot record; a terminal or /dev/null does not."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _cli_values(args: Args) -> dict[str, Any]:
    flags = {"--persistent": ("defaults.persistent", True), "--image": ("defaults.image", None),
             "--tool": ("tool.name", None), "--network": ("network.mode", None),
             "--cpu": ("limits.cpu", None), "--memory": ("limits.memory", None),
             "--processes": ("limits.processes", None)}
    values: dict[str, Any] = {}
    for flag, (key, constant) in flags.items():
        if constant is not None:
            if args.get(flag):
                values[key] = constant
        elif args.get(flag) is not None:  # given empty is checked (and refused), not unset
            values[key] = args[flag]
    return values


def context_from_args(args: Args, *, record_on_stdin: bool) -> Context:
    """Flags and config (or a slot record on stdin) to a Context with a reserved slot."""
    if record_on_stdin and _stdin_is_data():
        record = sessions.SlotRecord.from_record(read_record("slot"))
        settings = config.load(record.workspace)
        tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
        limits = _limits(settings)
    else:
        settings = config.load(args["--workspace"], profile=args.get("--profile"),
                               cli=_cli_values(args))
        # An unknown tool or a bad limit is refused before a slot is reserved.
        tool = tools.get_tool(settings.get("tool.name"), tools.registry_from_config(settings))
        limits = _limits(settings)
        record = _new_record(args, settings)
    return Context(settings, incus.connect(settings), record, tool,
                   resume_id=str(args.get("--session") or ""),
                   limits=limits, mask=not args.get("--no-mask"),
                   mount_flags=_mount_flags(args))


def _mount_flags(args: Args) -> dict[str, bool]:
    return {"allow_home": bool(args.get("--allow-home")), "force": bool(args.get("--force"))}


def _limits(settings: config.Config) -> dict[str, str]:
    return container.limits_config(settings.get("limits.cpu"), settings.get("limits.memory"),
                                  settings.get("limits.processes"))


def _new_record(args: Args, settings: config.Config) -> sessions.SlotRecord:
    slot = naming.validate_slot(args["--slot"], settings.get("defaults.max_slots"),
                                allow_auto=True) if args["--slot"] is not None else None
    mounts = [sessions.Mount.parse(spec) for spec in args["--mount"]]
    extra_env = sessions.parse_env(args["--env"])
    storage = _storage_dir(args["--storage"]) if args["--storage"] is not None else ""
    # Every host path is refused before a slot is reserved or a directory is made.
    container.host_sources(args["--workspace"], storage, mounts, sessions.invoking_home(),
                           **_mount_flags(args))
    if storage:
        os.makedirs(storage, exist_ok=True)
    record = sessions.new_slot_record(incus.connect(settings), settings, args["--workspace"],
                                      slot=slot or None, mounts=mounts, storage=storage)
    return dataclasses.replace(record, environment={**record.environment, **extra_env})


def _storage_dir(path: str) -> str:
    if not path:
        raise BadInput("--storage needs a directory", hint="e.g. --storage ~/coi-storage")
    return os.path.realpath(os.path.expanduser(path))


# -- the container ----------------------------------------------------------------------


def ensure_container(ctx: Context) -> str:
    """Make the slot's container run; RUNNING when it was (attach to it), RESTARTED for
    a stopped persistent one started again, CREATED for a new one.

    Everything that can refuse (image, id map, network privilege) is checked
    before a container is created; a persistent container that is stopped is
    started again as it is, with whatever was installed in it.
    """
    name, client = ctx.record.container, ctx.client
    try:
        state = _state_of(client, name)
        if state is not None:
            instance = client.instance_config(name)
            _check_ours(instance, ctx.record.workspace)
            if state.get("status") == "Running":
                return RUNNING
            if sessions.is_persistent(instance):
                idmap = preflight(ctx)
                with progress.waiting(f"starting persistent {name}"):
                    _start(ctx, idmap, lambda _view: None, sessions.has_view(instance))
                    _wait_for_boot(ctx)
                return RESTARTED
            ending = sessions.end_session(client, name)  # a stopped ephemeral leftover
            if not ending.deleted:
                raise CoiError(f"slot {ctx.record.slot} holds a stopped leftover that could not "
                               f"be removed: {ending.message}")
        _create(ctx)
        try:
            with progress.waiting(f"waiting for {name} to boot"):
                _wait_for_boot(ctx)
        except BaseException:
            sessions.end_session(client, name, save=False)  # ours, just made, never used
            raise
        return CREATED
    finally:
        slots.release(ctx.settings.path("paths.state_dir"), ctx.record.workspace,
                      ctx.record.slot)


def _state_of(client: incus.Incus, name: str) -> dict[str, Any] | None:
    try:
        return client.instance_state(name)
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


def _check_ours(instance: dict[str, Any], workspace: str) -> None:
    owner = (instance.get("config") or {}).get(f"{sessions.KEY}workspace")
    if owner != workspace:
        raise CoiError(f"container {instance['name']} exists but is not a coi session of "
                       f"{workspace}", hint="pick another slot or prefix")


def preflight(ctx: Context) -> container.IdMap:
    """What must hold before a container is created (or started again): Incus may map
    the user's ids, and this user can have network rules applied. (A missing image
    is the create request's own refusal, before anything exists.) Returns the id map."""
    record = ctx.record
    idmap = container.session_idmap(record.workspace)
    container.ensure_idmap(idmap)
    if record.network != "open" and os.geteuid() != 0:
        from coi_common import hostservice  # noqa: PLC0415

        hostservice.call("ping", timeout=5)
    return idmap


def _create(ctx: Context) -> None:
    idmap = preflight(ctx)
    record = dataclasses.replace(ctx.record,
                                 environment={**ctx.tool.env, **ctx.record.environment})

    # Every host path is checked before the view makes anything in the workspace.
    devices = {**container.container_devices(record, sessions.invoking_home(),
                                             **ctx.mount_flags),
               **container.network_devices(record, ctx.settings)}

    def create(view: Any) -> None:
        try:
            # Created stopped: the egress rules go in before its first packet.
            with progress.waiting(f"creating {record.container} from image {record.image} "
                                  "(the first container of a new image takes longest)"):
                ctx.client.create_instance(
                    record.container, record.image, profiles=[record.profile],
                    config={**container.container_config(
                        record, idmap, owner=sessions.invoking_ids()[0],
                        allow_setuid=ctx.settings.get("security.allow_setuid")),
                        **ctx.limits},
                    devices=container.through_view(devices, view))
        except NotFound as exc:
            raise NotFound(exc.message, hint="build it with 'coi build'") from None
        container.apply_network(record, ctx.settings)

    try:
        _start(ctx, idmap, create)
    except BaseException:
        with contextlib.suppress(CoiError):
            sessions.end_session(ctx.client, record.container, save=False)
        raise


def _start(ctx: Context, idmap: container.IdMap, before: Callable[[Any], None],
           viewed: bool = True) -> None:
    """Start the container on a fresh view of the workspace (`before` runs first, with
    the view: creating the container); the view leaves the host once it started.
    `viewed` False: a container made before views mounts the workspace itself."""
    with container.workspace_view(ctx.record, ctx.settings, idmap, mask=ctx.mask,
                                 wanted=viewed, mount_flags=ctx.mount_flags) as view:
        before(view)
        ctx.client.set_state(ctx.record.container, "start")
    if view is not None:
        print(f"coi: {view.summary()}", file=sys.stderr)


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
    sessions.end_session(ctx.client, name, save=False)
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


def ensure_tmux(ctx: Context, *, resume: bool = False) -> None:
    """A tmux session running bash in /workspace, with the tool started in it."""
    if has_tmux_session(ctx):
        return
    started = _exec_quiet(ctx, ["tmux", "new-session", "-d", "-s", sessions.TMUX_SESSION,
                                "-x", "200", "-y", "50", "-c", sessions.WORKSPACE_PATH,
                                "bash", "-l"])
    if not started.ok:
        raise abandon(ctx, f"could not start tmux in {ctx.record.container}: "
                      f"{proc.last_line(started.stderr) or 'no output'}")
    # Typed into bash, so the user lands in bash when the tool exits.
    command = shlex.join(ctx.tool.command(resume=resume))
    for keys in (["-l", command], ["Enter"]):
        typed = _exec_quiet(ctx, ["tmux", "send-keys", "-t", sessions.TMUX_SESSION, *keys])
        if not typed.ok:
            raise abandon(ctx, f"could not start {ctx.tool.name} in {ctx.record.container}: "
                          f"{proc.last_line(typed.stderr) or 'no output'}")


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

    Decided under the container's ending lock: a `coi shutdown` that stopped the
    container may be ending it right now (its save even starts it for a moment).
    Waiting for that one, the shell then finds the container gone, or stopped with
    its session saved, and end_session does nothing twice."""
    name = ctx.record.container
    try:
        with sessions.ending_lock(ctx.client, name):
            return _end_when_down(ctx, exit_code)
    except locks.LockTimeout as exc:
        print(f"coi: {exc.one_line()}; 'coi list' shows what became of {name}",
              file=sys.stderr)
        return 1


def _end_when_down(ctx: Context, exit_code: int) -> int:
    name = ctx.record.container
    if _container_stopping(ctx):
        deadline = time.monotonic() + ATTACH_SETTLE_SECONDS
        while time.monotonic() < deadline and _status(ctx) not in DOWN:
            time.sleep(0.3)
    if _status(ctx) in DOWN:
        ending = sessions.end_session(ctx.client, name)
        if ending.message:
            print(f"coi: {ending.message}", file=sys.stderr)
            return 1
        print(f"coi: session in {name} ended; container "
              f"{'deleted' if ending.deleted else 'kept (persistent)'}", file=sys.stderr)
        return 0
    print(f"coi: {name} is still running: 'coi attach {name}' to return, "
          f"'coi shutdown {name}' to end it", file=sys.stderr)
    return exit_code


def _status(ctx: Context) -> str:
    try:
        return str(ctx.client.instance_state(ctx.record.container).get("status"))
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


def resume_target(ctx: Context, args: Args) -> saved_sessions.Session | None:
    """The saved session --resume[=ID] asks for: only ever one of this workspace and
    tool. None without --resume, or when this workspace has none (then the tool
    starts fresh, and we say so). A refusal releases the reserved slot."""
    if not (args.get("--resume") or args.get("--session")):
        return None
    try:
        store = saved_sessions.Store(ctx.settings.path("paths.state_dir"))
        session = store.for_resume(ctx.record.workspace, ctx.tool.name, args.get("--session"))
    except BaseException:
        slots.release(ctx.settings.path("paths.state_dir"), ctx.record.workspace,
                      ctx.record.slot)
        raise
    if session is None:
        print(f"coi: no saved {ctx.tool.name} session for {ctx.record.workspace}; "
              "starting fresh", file=sys.stderr)
    return session


def prepare_home(ctx: Context, session: saved_sessions.Session | None, *,
                 reused: bool = False) -> bool:
    """Before the tool starts in a container just started: restore `session` (if any),
    copy fresh credentials in, merge the settings file. True when the tool resumes.

    A persistent container started again (`reused`) keeps its own conversation:
    --resume then only starts the tool with its resume arguments, unless a
    session id was asked for. A failed restore abandons the container (removed
    when ephemeral, stopped when persistent); failing to copy credentials only
    warns, since the tool can still be logged into inside.
    """
    name = ctx.record.container
    if reused and session is not None and not ctx.resume_id:
        print(f"coi: resuming the conversation kept in persistent {name}", file=sys.stderr)
        session = None
        resumed = True
    else:
        resumed = session is not None
    try:
        with progress.waiting(f"restoring session {session.id} into {name}" if session
                              else f"copying credentials into {name}"):
            result = saved_sessions.restore_into(ctx.client, name, session,
                                                 settings=ctx.settings)
    except CoiError as exc:
        if session is None:
            print(f"coi: could not copy credentials into {name}: {exc.one_line()}",
                  file=sys.stderr)
            return resumed
        raise abandon(ctx, f"could not restore session {session.id}: {exc.one_line()}") \
            from None
    if session is not None:
        print(f"coi: {result.line()}", file=sys.stderr)
    return resumed


# -- the commands -------------------------------------------------------------------------


def shell(args: Args) -> int:
    """Start or reattach to the tool's tmux session and hand the terminal over; exit
    with what the terminal session ended with."""
    _check_session_flag(args)
    terminal = open_terminal()  # then: a script without a terminal is told at once
    try:
        ctx = context_from_args(args, record_on_stdin=True)
        wanted = resume_target(ctx, args)
        state = ensure_container(ctx)
        if state == RUNNING:
            print(f"coi: attaching to running {ctx.record.container}"
                  + ("; --resume does not apply to a running session" if wanted else ""),
                  file=sys.stderr)
        resumed = state != RUNNING and prepare_home(ctx, wanted, reused=state == RESTARTED)
        ensure_tmux(ctx, resume=resumed)
        code = hand_terminal_to(ctx, ["tmux", "attach-session", "-t", sessions.TMUX_SESSION],
                                terminal)
        return after_terminal(ctx, code)
    finally:
        if terminal is not None:
            terminal.close()


def _check_session_flag(args: Args) -> None:
    """A malformed --session (empty too) is refused before all else."""
    if args.get("--session") is not None:
        naming.validate_session_id(args["--session"])


def run_command(args: Args) -> int:
    """One command in the slot's container; cleaned up whatever happens. The container
    is deleted afterwards unless it is persistent (its own setting decides)."""
    _check_session_flag(args)
    ctx = context_from_args(args, record_on_stdin=False)
    wanted = resume_target(ctx, args)
    state = ensure_container(ctx)
    try:
        if state != RUNNING:
            prepare_home(ctx, wanted, reused=state == RESTARTED)
        spec = container.as_code(ctx.record.container, list(args["<command>"]), tty=False,
                                env=container.session_env(os.environ.get("TERM")))
        return ctx.client.exec_handover(spec)
    finally:
        ending = sessions.end_session(ctx.client, ctx.record.container)
        if ending.message:
            print(f"coi: {ending.message}", file=sys.stderr)


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
    keys = instance.get("config") or {}
    get = lambda key, default="": keys.get(f"{sessions.KEY}{key}", default)  # noqa: E731
    slot = get("slot", "0")
    return sessions.SlotRecord(
        workspace=get("workspace"), slot=int(slot) if slot.isdigit() else 0,
        container=instance["name"], persistent=get("persistent") == "true", image=get("image"),
        profile=settings.get("incus.profile") if settings else "",
        tool=get("tool", settings.get("tool.name") if settings else "claude"),
        network=get("network", "restricted"))
