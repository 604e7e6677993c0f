"""`coi shell`, `coi attach` and `coi run`: bring a container up and hand it the terminal.

Containers are created non-ephemeral in Incus terms, so the session can
still be saved after a `sudo poweroff` from inside; coi deletes them itself
afterwards unless they are persistent, always through
`sessions.end_session` (the save hook).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

from coi_common import config, incus, naming, proc, saved_sessions, sessions, slots, tools
from coi_common.entry import Args
from coi_common.errors import BadInput, CoiError, IncusError, NotFound, UsageError
from coi_common.protocol import read_record

ATTACH_SETTLE_SECONDS = 30.0
DEFAULT_TERM = "xterm-256color"
BOOT_SECONDS = 60
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
             "--tool": ("tool.name", None), "--network": ("network.mode", None)}
    values: dict[str, Any] = {}
    for flag, (key, constant) in flags.items():
        if args.get(flag):
            values[key] = constant if constant is not None else args[flag]
    return values


def context_from_args(args: Args, *, record_on_stdin: bool) -> Context:
    """Flags and config (or a slot record on stdin) to a Context with a reserved slot."""
    if record_on_stdin and _stdin_is_data():
        record = sessions.SlotRecord.from_record(read_record("slot"))
        settings = config.load(record.workspace)
    else:
        settings = config.load(args["--workspace"], profile=args.get("--profile"),
                               cli=_cli_values(args))
        record = _new_record(args, settings)
    client = incus.connect(settings)
    tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
    return Context(settings, client, record, tool)


def _new_record(args: Args, settings: config.Config) -> sessions.SlotRecord:
    slot = naming.validate_slot(args["--slot"], settings.get("defaults.max_slots"),
                                allow_auto=True) if args["--slot"] else None
    mounts = [sessions.Mount.parse(spec) for spec in args["--mount"]]
    storage = _storage_dir(args["--storage"]) if args["--storage"] else ""
    extra_env = sessions.parse_env(args["--env"])
    record = sessions.new_slot_record(incus.connect(settings), settings, args["--workspace"],
                                      slot=slot or None, mounts=mounts, storage=storage)
    return dataclasses.replace(record, environment={**record.environment, **extra_env})


def _storage_dir(path: str) -> str:
    folder = os.path.realpath(os.path.expanduser(path))
    os.makedirs(folder, exist_ok=True)
    return folder


# -- the container ----------------------------------------------------------------------


def ensure_container(ctx: Context) -> bool:
    """Make the slot's container run; True when it was already running (attach to it)."""
    name, client = ctx.record.container, ctx.client
    try:
        state = client.instance_state(name)
    except NotFound:
        state = None
    try:
        if state is not None:
            _check_ours(client.instance_config(name), ctx.record.workspace)
            if state.get("status") == "Running":
                return True
            if sessions.is_persistent(client.instance_config(name)):
                client.set_state(name, "start")
                _wait_for_boot(ctx)
                return False
            sessions.end_session(client, name, delete=True)  # a stopped leftover
        _create(ctx)
        try:
            _wait_for_boot(ctx)
        except BaseException:
            client.delete_instance_force(name)  # ours, just made, never used
            raise
        return False
    finally:
        slots.release(ctx.settings.path("paths.state_dir"), ctx.record.workspace,
                      ctx.record.slot)


def _wait_for_boot(ctx: Context) -> None:
    argv = ["exec", ctx.record.container, "--", "sh", "-c", WAIT_FOR_BOOT]
    for attempt in range(3):  # an exec Incus failed to start is tried again
        done = ctx.client.cli(argv, check=False, timeout=BOOT_SECONDS + 10)
        if done.ok or incus.EXEC_NOT_STARTED not in done.stderr:
            break
        time.sleep(0.3 * (attempt + 1))
    if not done.ok:
        raise CoiError(f"{ctx.record.container} did not finish booting within "
                       f"{BOOT_SECONDS} s")


def _check_ours(instance: dict[str, Any], workspace: str) -> None:
    owner = (instance.get("config") or {}).get(f"{sessions.KEY}workspace")
    if owner != workspace:
        raise CoiError(f"container {instance['name']} exists but is not a coi session of "
                       f"{workspace}", hint="pick another slot or prefix")


def _create(ctx: Context) -> None:
    record = dataclasses.replace(ctx.record,
                                 environment={**ctx.tool.env, **ctx.record.environment})
    uid, gid = sessions.invoking_ids()
    features = ctx.client.server().get("environment", {}).get("kernel_features", {})
    idmap = sessions.choose_idmap(uid, gid, features.get("idmapped_mounts") == "true")
    devices = {**sessions.container_devices(record, idmap),
               **sessions.network_devices(record, ctx.settings)}
    try:
        # Created stopped: the egress rules go in before its first packet.
        ctx.client.create_instance(
            record.container, record.image, profiles=[record.profile],
            config=sessions.container_config(record, idmap), devices=devices)
    except NotFound as exc:
        raise NotFound(exc.message, hint="build it with 'coi build'") from None
    except IncusError as exc:
        with_hint = "not allowed" in exc.message or "idmap" in exc.message.lower()
        if with_hint:
            ctx.client.delete_instance_force(record.container)
            raise IncusError(exc.message, hint=f"allow uid/gid {uid}/{gid} for Incus: "
                             "sudo coi setup") from None
        raise
    try:
        sessions.apply_network(record, ctx.settings)
        ctx.client.set_state(record.container, "start")
    except BaseException:
        sessions.end_session(ctx.client, record.container, delete=True)
        raise


# -- tmux inside ------------------------------------------------------------------------


def _exec_quiet(ctx: Context, command: list[str]) -> proc.Result:
    env = sessions.session_env(DEFAULT_TERM)
    argv = sessions.exec_argv(ctx.client, ctx.record.container, command, tty=False, env=env)
    return proc.run(argv, check=False, timeout=30)


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
        raise CoiError(f"could not start tmux in {ctx.record.container}: "
                       f"{proc.last_line(started.stderr)}")
    # Typed into bash, so the user lands in bash when the tool exits.
    command = shlex.join(ctx.tool.command(resume=resume))
    _exec_quiet(ctx, ["tmux", "send-keys", "-t", sessions.TMUX_SESSION, "-l", command])
    _exec_quiet(ctx, ["tmux", "send-keys", "-t", sessions.TMUX_SESSION, "Enter"])


def open_terminal() -> IO[bytes] | None:
    """None when our own stdin is the terminal; else /dev/tty (stdin carried a record)."""
    if sys.stdin.isatty():
        return None
    try:
        # Unbuffered binary: a text or buffered "r+" stream wants a seekable file.
        return open("/dev/tty", "rb+", buffering=0)
    except OSError:
        raise UsageError("coi shell needs a terminal", hint="use 'coi run -- CMD' from "
                         "scripts") from None


def hand_terminal_to(ctx: Context, command: list[str]) -> int:
    terminal = open_terminal()
    env = sessions.session_env(os.environ.get("TERM") or DEFAULT_TERM)
    argv = sessions.exec_argv(ctx.client, ctx.record.container, command, tty=True, env=env)
    try:
        return proc.hand_over(argv, terminal=terminal)
    finally:
        if terminal is not None:
            terminal.close()


def after_terminal(ctx: Context, exit_code: int) -> None:
    """Poweroff inside ends the session (save, delete unless persistent); else say how
    to come back."""
    name = ctx.record.container
    if _container_stopping(ctx, exit_code):
        deadline = time.monotonic() + ATTACH_SETTLE_SECONDS
        while time.monotonic() < deadline and _status(ctx) != "Stopped":
            time.sleep(0.3)
    if _status(ctx) == "Stopped":
        persistent = sessions.is_persistent(ctx.client.instance_config(name))
        sessions.end_session(ctx.client, name, delete=not persistent)
        print(f"coi: session in {name} ended; container "
              f"{'kept (persistent)' if persistent else 'deleted'}", file=sys.stderr)
        return
    print(f"coi: {name} is still running: 'coi attach {name}' to return, "
          f"'coi shutdown {name}' to end it", file=sys.stderr)


def _status(ctx: Context) -> str:
    try:
        return str(ctx.client.instance_state(ctx.record.container).get("status"))
    except NotFound:
        return "Gone"
    except IncusError:
        return "Stopping"  # Incus cannot read the state of a container halfway down


def _container_stopping(ctx: Context, exit_code: int) -> bool:
    if has_tmux_session(ctx):
        return False  # detached
    if exit_code == 0:
        state = _exec_quiet(ctx, ["systemctl", "is-system-running"]).stdout.strip()
        return state in ("stopping", "")
    return True


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


def prepare_home(ctx: Context, session: saved_sessions.Session | None) -> bool:
    """Before the tool starts in a container just started: restore `session` (if any),
    copy fresh credentials in, merge the settings file. True when resumed.

    A failed restore removes an ephemeral container (it holds nothing yet); failing
    to copy credentials only warns, since the tool can still be logged into inside.
    """
    name = ctx.record.container
    try:
        result = saved_sessions.restore_into(ctx.client, name, session, settings=ctx.settings)
    except CoiError as exc:
        if session is None:
            print(f"coi: could not copy credentials into {name}: {exc.one_line()}",
                  file=sys.stderr)
            return False
        if not sessions.is_persistent(ctx.client.instance_config(name)):
            ctx.client.delete_instance_force(name)
        raise
    if session is not None:
        print(f"coi: {result.line()}", file=sys.stderr)
    return session is not None


# -- the commands -------------------------------------------------------------------------


def shell(args: Args) -> int:
    """Start or reattach to the tool's tmux session and hand the terminal over."""
    ctx = context_from_args(args, record_on_stdin=True)
    wanted = resume_target(ctx, args)
    running = ensure_container(ctx)
    if running:
        print(f"coi: attaching to running {ctx.record.container}"
              + ("; --resume does not apply to a running session" if wanted else ""),
              file=sys.stderr)
    resumed = False if running else prepare_home(ctx, wanted)
    ensure_tmux(ctx, resume=resumed)
    code = hand_terminal_to(ctx, ["tmux", "attach-session", "-t", sessions.TMUX_SESSION])
    after_terminal(ctx, code)
    return 0


def run_command(args: Args) -> int:
    """One command in the slot's container; cleaned up whatever happens."""
    ctx = context_from_args(args, record_on_stdin=False)
    wanted = resume_target(ctx, args)
    if not ensure_container(ctx):
        prepare_home(ctx, wanted)
    env = sessions.session_env(os.environ.get("TERM"))
    argv = sessions.exec_argv(ctx.client, ctx.record.container, list(args["<command>"]),
                              tty=False, env=env)
    try:
        return proc.hand_over(argv)
    finally:
        sessions.end_session(ctx.client, ctx.record.container,
                             delete=not ctx.record.persistent)


def attach(args: Args) -> int:
    """Reattach to a running session of this workspace (or the named container)."""
    settings = config.load(args["--workspace"])
    client = incus.connect(settings)
    instance = _pick_attach_target(client, args)
    record = _record_of(instance, settings)
    tool = tools.get_tool(record.tool, tools.registry_from_config(settings))
    ctx = Context(settings, client, record, tool)
    if args["--bash"]:
        code = hand_terminal_to(ctx, ["bash", "-l"])
    else:
        ensure_tmux(ctx)
        code = hand_terminal_to(ctx, ["tmux", "attach-session", "-t", sessions.TMUX_SESSION])
    after_terminal(ctx, code)
    return 0


def _pick_attach_target(client: incus.Incus, args: Args) -> dict[str, Any]:
    prefix = naming.container_prefix()
    ours = {i["name"]: i for i in sessions.coi_containers(client, prefix)}
    if args["<name>"]:
        name = naming.validate_container_name(args["<name>"])
        if name not in ours:
            if client.instance_exists(name):
                raise CoiError(f"{name} is not a coi session container")
            raise NotFound(f"no container {name}", hint="coi list shows the sessions")
        candidates = [ours[name]]
    else:
        workspace = naming.canonical_workspace(args["--workspace"])
        candidates = [i for i in ours.values()
                      if i["config"].get(f"{sessions.KEY}workspace") == workspace]
        if args["--slot"]:
            slot = str(naming.validate_slot(args["--slot"], naming.SLOT_CEILING))
            candidates = [i for i in candidates if i["config"].get(f"{sessions.KEY}slot") == slot]
        if not candidates:
            raise NotFound(f"no coi session for {workspace}", hint="start one: coi shell")
    running = [i for i in candidates if i.get("status") == "Running"]
    if not running:
        raise CoiError(f"{candidates[0]['name']} is stopped",
                       hint="start it again with coi shell --slot N")
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


def _record_of(instance: dict[str, Any], settings: config.Config) -> sessions.SlotRecord:
    keys = instance.get("config") or {}
    get = lambda key, default="": keys.get(f"{sessions.KEY}{key}", default)  # noqa: E731
    return sessions.SlotRecord(
        workspace=get("workspace"), slot=int(get("slot", "0") or 0), container=instance["name"],
        persistent=get("persistent") == "true", image=get("image"),
        profile=settings.get("incus.profile"), tool=get("tool", settings.get("tool.name")),
        network=get("network", "restricted"))
