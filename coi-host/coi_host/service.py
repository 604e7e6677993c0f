"""`coi-host serve`: coi's host service, the one part of coi that runs as root.

Members of incus-admin are not root, and sudo may be missing, yet the default
network mode needs nftables rules and a user added after `coi setup` needs
Incus to be allowed to map their uid. `coi setup` starts this service from a
root-owned copy of coi (coi_host.install); it listens on a unix socket that
only root and the incus-admin group may open, and answers one JSON request
per connection (docs/host-service.md):

- `ping`: the service's version; the caller's uid as the service sees it; what
  its upkeep of rules did last (coi_host.upkeep: restore, refresh and gc of
  egress rules every few seconds, with no cron), and whether the allowlist
  resolver it keeps running (`coi-net dns`) runs.
- `net_apply`, `net_remove`, `net_status`: run the root-owned coi-net with
  arguments built here from validated fields, for a coi container that exists
  (apply) or a valid container name (remove, status).
- `idmap_grant`: add `root:UID:1` / `root:GID:1` to /etc/subuid and /etc/subgid
  for the CALLER's own uid and primary gid (from SO_PEERCRED), nothing else.
- `view_build`, `view_release`: the read-only/masked view of a workspace the
  caller owns, for a container about to start (coi_common.views); mounts only
  under /run/coi/views, placed by file descriptor inside the workspace.

What it trusts: the kernel's peer credentials, checked again against the
group database (root, or a member of incus-admin). Such a member can already
do anything to Incus, which is root-equivalent (a privileged container); the
service gives them strictly less: rules in coi's own tables for coi's
containers, and an id delegation for themselves.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import signal
import socket
import socketserver
import stat
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

from coi_common import (
    __version__,
    config,
    hostservice,
    idmap,
    incus,
    locks,
    naming,
    proc,
)
from coi_common.errors import BadInput, CoiError, NotFound, PermissionDenied
from coi_common.executables import find_executable
from coi_common.protocol import Record, error_record, make_record, parse_record
from coi_host import install, spare, upkeep, views

MAX_ENTRIES: Final = 1000
MAX_ENTRY_LENGTH: Final = 255
REQUEST_SECONDS: Final = 10.0
"""How long a client may take to send its request line."""
NET_SECONDS: Final = 120.0


class Peer:
    """Who is on the other end of a connection: from SO_PEERCRED, checked against the group."""

    def __init__(self, connection: socket.socket, group: str) -> None:
        creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.allowed = self.uid == 0 or member_of(self.uid, group)


def member_of(uid: int, group: str) -> bool:
    """Whether the account `uid` belongs to `group` (as primary or secondary group)."""
    try:
        account = pwd.getpwuid(uid)
        entry = grp.getgrnam(group)
    except KeyError:
        return False
    return account.pw_gid == entry.gr_gid or account.pw_name in entry.gr_mem


# -- requests ----------------------------------------------------------------------------------


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_ENTRIES or not all(
            isinstance(v, str) and 0 < len(v) <= MAX_ENTRY_LENGTH for v in value):
        raise BadInput(f"{field}: expected a list of at most {MAX_ENTRIES} short strings")
    return value


def _container(request: Mapping[str, Any]) -> str:
    name = request.get("container")
    if not isinstance(name, str):
        raise BadInput("container: expected a container name")
    return naming.validate_container_name(name)


def _own_workspace(peer: Peer, request: Mapping[str, Any]) -> str:
    """The workspace path of a request, resolved: a directory the peer owns (root: any)
    that a session may mount (with the request's allow_home / force)."""
    value = request.get("workspace")
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise BadInput("workspace: expected an absolute path")
    real = os.path.realpath(value)
    try:
        info = os.stat(real)
    except OSError:
        raise NotFound(f"workspace {value!r} does not exist") from None
    if peer.uid not in (0, info.st_uid):
        raise PermissionDenied(f"workspace {value!r} does not belong to uid {peer.uid}")
    flags = {flag: request.get(flag, False) for flag in ("allow_home", "force")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise BadInput("allow_home, force: expected true or false")
    return naming.check_host_mount(real, "workspace", pwd.getpwuid(peer.uid).pw_dir, **flags)


def net_apply_argv(request: Mapping[str, Any]) -> list[str]:
    """coi-net apply's arguments from a request; every field checked, nothing passed
    through that could become an option of its own."""
    mode = request.get("mode")
    if mode not in naming.NETWORK_MODES:
        raise BadInput(f"mode: expected one of {', '.join(naming.NETWORK_MODES)}")
    minutes = request.get("refresh_minutes", 30)
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 0 <= minutes <= 10080:
        raise BadInput("refresh_minutes: expected a whole number of minutes, 0..10080")
    argv = ["apply", _container(request), f"--mode={mode}",
            f"--refresh-minutes={minutes}", "--format=json"]
    argv += [f"--allow={entry}" for entry in _strings(request.get("allow", []), "allow")]
    argv += [f"--resolver={entry}" for entry in _strings(request.get("resolvers", []),
                                                         "resolvers")]
    return argv


class Service:
    """The verbs, each checked for the peer; one instance serves every connection."""

    def __init__(self, settings: config.Config, tick: float = upkeep.TICK_SECONDS) -> None:
        self.group = settings.get("incus.group")
        self.client = incus.connect(settings)
        self.coi_net = spare.Spare(find_executable("coi-net") or "coi-net")
        self.upkeep = upkeep.Upkeep(self.run_coi_net, tick)
        self.resolver = upkeep.Watched([self.coi_net.program, "dns"])
        self.code = install.code_digest()
        self.verbs: dict[str, Callable[[Peer, Record], Record]] = {
            "ping": self.ping, "net_apply": self.net_apply, "net_remove": self.net_remove,
            "net_status": self.net_status, "idmap_grant": self.idmap_grant,
            "view_build": self.view_build, "view_release": self.view_release}

    def answer(self, peer: Peer, raw: bytes) -> Record:
        """The reply record to one request line; every failure is an error record."""
        try:
            if not peer.allowed:
                raise PermissionDenied(f"uid {peer.uid} is neither root nor a member of "
                                       f"{self.group}")
            request = parse_record(raw.decode("utf-8", "replace"), "host_request")
            verb = request["verb"]
            if verb not in self.verbs:
                raise BadInput(f"unknown verb {verb!r}; known: {', '.join(self.verbs)}")
            return make_record("host_reply", verb=verb, result=self.verbs[verb](peer, request))
        except CoiError as exc:
            return error_record(exc)
        except Exception as exc:  # the client gets one line; the service keeps serving
            return error_record(CoiError(f"internal error: {type(exc).__name__}: {exc}"))

    def ping(self, peer: Peer, _request: Record) -> Record:
        return {"version": __version__, "code": self.code, "uid": peer.uid,
                "pid": os.getpid(), "verbs": list(self.verbs), "upkeep": self.upkeep.state(),
                "resolver": self.resolver.state()}

    def net_apply(self, _peer: Peer, request: Record) -> Record:
        argv = net_apply_argv(request)
        name = argv[1]
        keys = (self.client.instance_config(name).get("config") or {})
        if "user.coi.workspace" not in keys:
            raise PermissionDenied(f"{name} is not a coi session container")
        return self.run_coi_net(argv)

    def net_remove(self, _peer: Peer, request: Record) -> Record:
        return self.run_coi_net(["remove", _container(request), "--format=json"])

    def net_status(self, _peer: Peer, request: Record) -> Record:
        """One container's status, or every one's (no `container`); its exit code (which
        says whether each policy is in force) comes back as `status`."""
        names = [] if request.get("container") is None else [_container(request)]
        return self.run_coi_net(["status", *names, "--format=json"], statuses=(0, 1, 4))

    def idmap_grant(self, peer: Peer, _request: Record) -> Record:
        gid = pwd.getpwuid(peer.uid).pw_gid
        added = idmap.add_lines(idmap.missing_lines([peer.uid], [gid]))
        return {"uid": peer.uid, "gid": gid, "added": added}

    def view_build(self, peer: Peer, request: Record) -> Record:
        name, workspace = _container(request), _own_workspace(peer, request)
        view = views.build(name, workspace, _strings(request.get("protect", []), "protect"),
                           _strings(request.get("mask", []), "mask"))
        return view.to_record()

    def view_release(self, _peer: Peer, request: Record) -> Record:
        forget = request.get("forget", False)
        if not isinstance(forget, bool):
            raise BadInput("forget: expected true or false")
        views.release(_container(request), forget=forget)
        return {}

    def run_coi_net(self, argv: list[str], statuses: tuple[int, ...] = (0,)) -> Record:
        """Root's `coi-net ARGV`, by the spare started for it: its ~60 ms of start-up
        (Python and coi-net's code) are then off the session's path. An exit status
        other than `statuses`, or an error record, is its failure."""
        done = self.coi_net.run(argv, timeout=NET_SECONDS)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        error = _error_of(lines)
        if done.returncode not in statuses or error:
            error = error or proc.last_line(done.stderr) or f"exit {done.returncode}"
            raise CoiError(f"coi-net {argv[0]}: {error}")
        try:
            return {"records": [json.loads(line) for line in lines], "status": done.returncode}
        except ValueError:
            raise CoiError(f"coi-net {argv[0]} printed something that is not JSON") from None


def _error_of(lines: list[str]) -> str:
    """The message of coi-net's error record (its last line), else ""."""
    with contextlib.suppress(ValueError, IndexError, TypeError, KeyError, AttributeError):
        last = json.loads(lines[-1])
        if last.get("kind") == "error":
            return str(last["message"])
    return ""


# -- the socket --------------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(REQUEST_SECONDS)
        peer = Peer(connection, self.server.service.group)
        try:
            raw = hostservice.read_line(connection)
        except (OSError, BadInput):
            return
        if not raw:
            return
        connection.settimeout(NET_SECONDS + 10)
        reply = self.server.service.answer(peer, raw)
        with contextlib.suppress(OSError):
            connection.sendall(json.dumps(reply).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, service: Service) -> None:
        self.service = service
        super().__init__(path, _Handler)


def serve(path: str, tick: float = upkeep.TICK_SECONDS) -> int:
    """Listen on `path` (root:GROUP, 0660) until stopped; root only. What is at `path`
    is replaced only when it is a socket (a stale one of ours)."""
    if os.geteuid() != 0:
        raise PermissionDenied("coi-host serve runs as root", hint="sudo coi setup starts it")
    if not os.path.isabs(path):
        raise BadInput(f"--socket {path!r} must be an absolute path",
                       hint=f"e.g. {hostservice.DEFAULT_SOCKET}")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BadInput(f"--socket {path} exists and is not a socket; it is left alone")
    service = Service(config.load(None), tick)
    service.coi_net.start()
    with contextlib.suppress(CoiError):  # Incus not up yet: a start through coi makes them
        for name in views.keep_directories(service.client.instances()):
            print(f"coi-host serve: made the view directory of {name} again", file=sys.stderr)
    with contextlib.suppress(CoiError, OSError):  # members fall back to their own folders
        locks.prepare_ending_locks(service.client)
    try:
        gid = grp.getgrnam(service.group).gr_gid
    except KeyError:
        raise NotFound(f"group {service.group} does not exist", hint="run 'coi setup'") from None
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    old_umask = os.umask(0o117)
    try:
        server = _Server(path, service)
    finally:
        os.umask(old_umask)
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    print(f"coi-host serve: {__version__} listening on {path} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    # SIGTERM (systemctl stop, setup replacing the service) ends it like Ctrl-C: the
    # socket file goes with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service.upkeep.start()  # its first round at once: rules a reboot took come back
    service.resolver.start()
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        service.resolver.stop()
        service.coi_net.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0
