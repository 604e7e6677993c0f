"""The one module that talks to Incus.

Data goes over Incus's REST API on its unix socket, in-process: one request
costs ~15-20 ms here against ~40-70 ms for an `incus` CLI call (measured; see
README), and it always answers JSON whatever the user's CLI config says. What
the REST API makes awkward from Python (interactive exec with a terminal,
recursive file transfer, image import from tarballs) goes through the `incus`
CLI, also from here, via `cli()`.

Each client keeps one HTTP/1.1 connection to the daemon per thread and reuses it
for every exchange, rather than a socket (and Incus's look at the peer's
credentials) per request; Incus closes a connection idle for a minute or two
(seen here), which is then opened again once, transparently. Every REST
exchange and every `incus` process is traced with COI_TRACE (coi_common.trace).

Every failure becomes a typed error: NotFound, AlreadyExists,
IncusUnavailable, PermissionDenied, or IncusError carrying Incus's message.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import quote, urlencode

from coi_common import httpunix, plan, proc, remotes, trace
from coi_common.errors import (
    AlreadyExists,
    CoiError,
    CommandFailed,
    IncusError,
    IncusUnavailable,
    NotFound,
    PermissionDenied,
)

T = TypeVar("T")

SOCKET_CANDIDATES: Final = ("/var/lib/incus/unix.socket", "/run/incus/unix.socket")
JOIN_GROUP_HINT: Final = ("join the incus-admin group: sudo usermod -aG incus-admin $USER, "
                          "then log in again")
START_HINT: Final = "start it with 'coi setup' (or 'systemctl start incus')"
WAIT_ROUND: Final = 60
"""Seconds one operation-wait request asks Incus to wait before it answers anyway."""
WAIT_MARGIN: Final = 30
"""Seconds a wait request's reply may lag behind its round before Incus counts as gone."""
READS: Final = ("GET", "HEAD")
"""The REST methods that change nothing: made in a --dry-run too (coi_common.plan)."""
PLANNED_REPLY: Final = (200, {}, b'{"type": "sync", "status_code": 200, "metadata": {}}')
"""What a change a --dry-run planned instead of making answers: done, nothing to add."""
RUNNING_OPERATION: Final = ("Pending", "Running", "Cancelling")
ROUND_ENDED: Final = "context deadline exceeded"
EXEC_NOT_STARTED: Final = ("Failed to retrieve PID of executing child process", "Invalid PID")
"""What Incus 6.0 answers, now and then under load, to an `exec` whose command never
started (about 3 in 40 session starts here); the exec can simply be tried again."""
DUPLICATE_SUCCEEDED: Final = "matching non-reusable operation has now succeeded"
"""Incus 6.0's refusal of an operation that duplicates one that just ended well."""
EXEC_PAUSES: Final = (0.2, 0.5, 1.0)
"""Pauses between the tries of an exec Incus failed to start: four tries in all."""
CLOSED_BY_INCUS: Final = (httpunix.Closed, BrokenPipeError, ConnectionResetError)
"""How a kept-alive connection that Incus closed while it was idle fails, before any byte
of an answer: the request is sent again on a new connection (once)."""
FILTERABLE_PREFIX: Final = re.compile(r"[A-Za-z0-9-]+")
"""Prefixes written as an Incus name filter: only characters of instance names, none
that Incus's filter language or its regular expressions treat specially."""


def socket_path(configured: str = "") -> str:
    """The daemon's unix socket: config, then $INCUS_SOCKET, $INCUS_DIR, the usual places."""
    if configured:
        return configured
    if os.environ.get("INCUS_SOCKET"):
        return os.environ["INCUS_SOCKET"]
    if os.environ.get("INCUS_DIR"):
        return os.path.join(os.environ["INCUS_DIR"], "unix.socket")
    for candidate in SOCKET_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return SOCKET_CANDIDATES[0]


def _sent(conn: httpunix.Connection, method: str, url: str, payload: bytes | None,
          headers: dict[str, str]) -> httpunix.Answer:
    """Send one request and read its answer. When a reused connection turns out closed
    by Incus before any byte of an answer, the request goes once more on a new
    connection; a new connection's failure is the caller's to report."""
    reused = conn.sock is not None
    try:
        return conn.exchange(method, url, payload, headers)
    except CLOSED_BY_INCUS:
        if not reused:
            raise
    conn.close()
    trace.retry(method, url, 0, "Incus had closed the kept-alive connection")
    return conn.exchange(method, url, payload, headers)


def _error_for(status: int, message: str, what: str) -> Exception:
    text = f"{what}: {message}" if what else message
    if status == 404:
        return NotFound(text)
    # Incus 6.0 reports a duplicate instance name only as a failed database insert.
    if (status == 409 or "already exists" in message.lower()
            or "unique constraint failed" in message.lower()):
        return AlreadyExists(text)
    if status == 403:
        return PermissionDenied(text, hint=JOIN_GROUP_HINT)
    return IncusError(text)


class Incus:
    """A client for one Incus daemon and project."""

    def __init__(self, socket: str = "", project: str = "default", timeout: float = 30.0,
                 remote: remotes.Remote | None = None, target: str = "") -> None:
        # A remote is reached over HTTPS (docs/remote.md); `socket` then names it in
        # messages only. `target`: the cluster member new instances are placed on.
        self.remote = remote
        self.target = target
        self.socket = remote.where() if remote else socket_path(socket)
        self._dial = remotes.dialer(remote) if remote else None
        self.project = project
        self.timeout = timeout
        self.connections_opened = 0
        """Connections made to the daemon so far: one per thread while Incus keeps it."""
        self._count_lock = threading.Lock()
        # One connection per thread (and process: a forked child must not talk on its
        # parent's socket), so a long operation wait in one thread holds up no other.
        self._local = threading.local()

    # -- raw REST ---------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *,
                params: Mapping[str, str] | None = None, what: str = "",
                wait: bool = True, timeout: float | None = None) -> Any:
        """One REST call; returns `metadata`, waiting for async operations when asked.

        `what` names the object for error messages ("container coi-ab-1");
        `timeout` is this exchange's socket timeout (default: the client's).
        An async operation is then waited for as long as it runs.
        """
        query = {"project": self.project, **(params or {})}
        url = f"{path}?{urlencode(query)}"
        reply = self._send(method, url, body, timeout)
        if reply.get("type") == "error":
            raise _error_for(int(reply.get("error_code") or 0), str(reply.get("error")), what)
        if reply.get("type") == "async" and wait:
            return self.wait_operation(reply["operation"], what=what)
        return reply.get("metadata")

    def _send(self, method: str, url: str, body: Any,
              timeout: float | None = None) -> dict[str, Any]:
        _status, _headers, raw = self._exchange(method, url, body, timeout)
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise IncusError(f"Incus answered something that is not JSON: {raw[:80]!r}") from None

    def _exchange(self, method: str, url: str, body: Any,
                  timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP exchange on this thread's connection: (status, lower-cased headers,
        body). A failed exchange closes the connection (its state is unknown); the
        next one opens another."""
        if method not in READS and plan.step(method, url, body=body):
            return PLANNED_REPLY[0], dict(PLANNED_REPLY[1]), PLANNED_REPLY[2]
        seconds = self.timeout if timeout is None else timeout
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        with trace.span(method, url) as call:
            conn = self._connection()
            conn.use_timeout(seconds)
            try:
                try:
                    answer = _sent(conn, method, url, payload, headers)
                except BaseException:
                    conn.close()
                    raise
            except (OSError, httpunix.ProtocolError) as exc:
                raise self._unreachable(exc, seconds) from None
            call.end(str(answer.status))
        return answer.status, answer.headers, answer.body

    def _unreachable(self, exc: Exception, seconds: float) -> CoiError:
        """The typed error of a failed exchange with the daemon."""
        if isinstance(exc, FileNotFoundError):
            return IncusUnavailable(f"Incus is not running (no socket at {self.socket})",
                                    hint=START_HINT)
        if isinstance(exc, ConnectionRefusedError):
            return IncusUnavailable(f"Incus is not answering on {self.socket}", hint=START_HINT)
        if isinstance(exc, PermissionError):
            return PermissionDenied(f"no permission to use the Incus socket {self.socket}",
                                    hint=JOIN_GROUP_HINT)
        if isinstance(exc, TimeoutError):
            return IncusUnavailable(f"Incus did not answer within {seconds:g} s")
        return IncusUnavailable(f"cannot talk to Incus on {self.socket}: {exc}")

    def _connection(self) -> httpunix.Connection:
        """This thread's connection (not connected yet when new)."""
        held = getattr(self._local, "held", None)
        if held is None or held[0] != os.getpid():
            held = (os.getpid(), httpunix.Connection(self.socket, self.timeout,
                                                     self._count_open, self._dial))
            self._local.held = held
        return held[1]

    def _count_open(self) -> None:
        with self._count_lock:
            self.connections_opened += 1

    def wait_operation(self, operation: str, *, what: str = "",
                       timeout: float | None = None) -> Any:
        """Wait for a background operation as long as it runs (or `timeout` s at most);
        raise its error if it failed.

        The wait goes in rounds of WAIT_ROUND seconds, each one exchange whose socket
        timeout is that round plus WAIT_MARGIN: a publish of several minutes is
        waited for, while a daemon that stops answering is still noticed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_ROUND if deadline is None else deadline - time.monotonic()
            round_seconds = max(1, min(WAIT_ROUND, math.ceil(left)))
            query = urlencode({"project": self.project, "timeout": round_seconds})
            url = f"{operation}/wait?{query}"
            reply = self._send("GET", url, None, round_seconds + WAIT_MARGIN)
            result = reply.get("metadata") or {}
            if reply.get("type") == "error":
                # A round that ended with the operation still running: Incus 6.0 answers
                # "context deadline exceeded" (later versions the running operation). A
                # failed operation can say the same words (a stop that timed out), and
                # one may end just as the round does: the operation itself tells which.
                message = str(reply.get("error"))
                result = (self._operation_state(operation) or {}) \
                    if ROUND_ENDED in message else {}
                if not result:
                    raise _error_for(int(reply.get("error_code") or 0), message, what)
            if result.get("status") not in RUNNING_OPERATION:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise IncusError(f"{what or operation}: still running after {timeout:g} s")
        if result and result.get("status_code", 200) >= 400:
            raise _error_for(int(result["status_code"]), str(result.get("err")), what)
        return result

    def _operation_state(self, operation: str) -> dict[str, Any] | None:
        """An operation as it is now (no waiting); None once Incus has forgotten it."""
        reply = self._send("GET", f"{operation}?{urlencode({'project': self.project})}", None)
        return None if reply.get("type") == "error" else (reply.get("metadata") or None)

    # -- server -------------------------------------------------------------

    def server(self) -> dict[str, Any]:
        """GET /1.0: API and server versions, environment, trust."""
        return self.request("GET", "/1.0")

    def server_version(self) -> str:
        return str(self.server().get("environment", {}).get("server_version", "unknown"))

    # -- instances ----------------------------------------------------------

    def instances(self, prefix: str = "", *, with_state: bool = False) -> list[dict[str, Any]]:
        """The instances whose names start with `prefix`: name, status, config, devices,
        times, in one request (recursion=1) that Incus filters by the prefix itself.

        with_state adds the `state` (addresses, processes) of each one that is not
        stopped, one request each: reading it costs Incus a look into the container
        (~25 ms a running one here, against ~3 ms for the whole filtered listing), so
        ask for it only to show it. Not recursion=2: Incus 6.0 renders the state of
        every instance on the host for it, the filtered-out ones included. A stopped
        instance's state has nothing to show; one whose state cannot be read (gone, or
        halfway down) is listed without, as Incus's own listing does.
        """
        wanted = name_filter(prefix)
        params = {"recursion": "1", **({"filter": wanted} if wanted else {})}
        # The exact, case-sensitive test is ours: newer Incus matches names without case.
        found = [i for i in self.request("GET", "/1.0/instances", params=params) or []
                 if i["name"].startswith(prefix)]
        for instance in found if with_state else ():
            if instance.get("status") != "Stopped":
                with contextlib.suppress(NotFound, IncusError):
                    instance["state"] = self.instance_state(instance["name"])
        return found

    def instance(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/1.0/instances/{_seg(name)}",
                            params={"recursion": "1"}, what=f"container {name}")

    def instance_config(self, name: str) -> dict[str, Any]:
        """The container's definition (config, devices, profiles) without its state."""
        return self.request("GET", f"/1.0/instances/{_seg(name)}", what=f"container {name}")

    def instance_exists(self, name: str) -> bool:
        try:
            self.instance(name)
        except NotFound:
            return False
        return True

    def create_instance(self, name: str, image_alias: str, *, profiles: Sequence[str] = (),
                        config: Mapping[str, str] | None = None,
                        devices: Mapping[str, Mapping[str, str]] | None = None,
                        ephemeral: bool = False, start: bool = False) -> None:
        """Create a container from a local image alias (and start it when asked)."""
        body = {"name": name, "type": "container", "ephemeral": ephemeral, "start": start,
                "profiles": list(profiles) or ["default"], "config": dict(config or {}),
                "devices": {k: dict(v) for k, v in (devices or {}).items()},
                "source": {"type": "image", "alias": image_alias}}
        placed = {"target": self.target} if self.target else None
        try:
            self.request("POST", "/1.0/instances", body, params=placed,
                         what=f"container {name}")
        except IncusError:
            # A missing alias fails as "Image not provided for instance creation"; name it.
            if self.image_by_alias(image_alias) is None:
                raise NotFound(f"image {image_alias}: no such image alias") from None
            raise

    def set_state(self, name: str, action: str, *, force: bool = False,
                  timeout: int = -1) -> None:
        """start, stop, restart, freeze or unfreeze a container."""
        body = {"action": action, "force": force, "timeout": timeout}
        path = f"/1.0/instances/{_seg(name)}/state"

        def attempt() -> IncusError | None:
            try:
                self.request("PUT", path, body, what=f"container {name}")
            except IncusError as exc:
                return exc
            return None

        # A start whose id-map helper lost a race ("Invalid PID", seen about once in 50
        # starts here) succeeds when tried again: the same policy as a failed exec.
        failed = retry_exec(ExecSpec(name, (action,)), attempt,
                            lambda exc: exc is not None and action == "start"
                            and exec_not_started(exc.message), traced_as=("PUT", path))
        if failed is not None:
            raise failed

    def set_config(self, name: str, values: Mapping[str, str]) -> None:
        """Set config keys of a container (PATCH: keys not given stay as they are)."""
        self.request("PATCH", f"/1.0/instances/{_seg(name)}", {"config": dict(values)},
                     what=f"container {name}")

    def edit_instance(self, name: str, *, config: Mapping[str, str] | None = None,
                      unset: Sequence[str] = (),
                      devices: Mapping[str, Mapping[str, str]] | None = None,
                      remove_devices: Sequence[str] = ()) -> None:
        """Change a container's own config keys and devices in one PUT: set `config`,
        drop the keys in `unset`, set (replace) `devices`, drop `remove_devices`.
        PATCH can add but never remove, hence the read-modify-write."""
        current = self.instance_config(name)
        body = {key: current.get(key) for key in ("architecture", "config", "devices",
                                                  "ephemeral", "profiles", "stateful",
                                                  "description")}
        body["config"] = {k: v for k, v in (current.get("config") or {}).items()
                          if k not in unset}
        body["config"].update(config or {})
        body["devices"] = {k: v for k, v in (current.get("devices") or {}).items()
                           if k not in remove_devices}
        body["devices"].update({k: dict(v) for k, v in (devices or {}).items()})
        self.request("PUT", f"/1.0/instances/{_seg(name)}", body, what=f"container {name}")

    def delete_instance(self, name: str) -> None:
        """Delete `name`. When another process deletes it at the same moment (a warm
        pool's session ending in the background, a kill), Incus refuses the second
        delete as a duplicate of one that "has now succeeded": that is done too."""
        try:
            self.request("DELETE", f"/1.0/instances/{_seg(name)}", what=f"container {name}")
        except IncusError as exc:
            if DUPLICATE_SUCCEEDED not in exc.message or self.instance_exists(name):
                raise

    def instance_state(self, name: str) -> dict[str, Any]:
        """GET .../state: status, processes and network addresses of one container."""
        return self.request("GET", f"/1.0/instances/{_seg(name)}/state",
                            what=f"container {name}")

    def add_device(self, name: str, device: str, settings: Mapping[str, str]) -> None:
        """Add one device to a container's own devices (PATCH merges; others stay)."""
        self.patch_instance(name, devices={device: settings})

    def patch_instance(self, name: str, *, config: Mapping[str, str] | None = None,
                       devices: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """Change these config keys and own devices of a container in one PATCH (it
        merges: other keys and devices stay)."""
        body: dict[str, Any] = {}
        if config:
            body["config"] = dict(config)
        if devices:
            body["devices"] = {device: dict(settings) for device, settings in devices.items()}
        self.request("PATCH", f"/1.0/instances/{_seg(name)}", body, what=f"container {name}")

    def file_type(self, name: str, path: str) -> str | None:
        """`file`, `directory` or `symlink` at an absolute path in a container
        (running or stopped), None when nothing is there. A missing container
        is also None: check it first."""
        query = urlencode({"project": self.project, "path": path})
        status, headers, _ = self._exchange("HEAD", f"/1.0/instances/{_seg(name)}/files?{query}",
                                            None)
        if status == 404:
            return None
        if status >= 400:
            raise _error_for(status, f"cannot look at {path} (HTTP {status})",
                             f"container {name}")
        return headers.get("x-incus-type", "")

    def status(self, name: str) -> str:
        """Running, Stopped, ...: from the instance itself (~2 ms), not its state (which
        costs Incus a look into the container, ~25 ms here)."""
        return str(self.instance_config(name).get("status") or "")

    def delete_instance_force(self, name: str) -> None:
        """Stop (at once) if running, then delete; a missing container is fine."""
        try:
            status = self.status(name)
        except NotFound:
            return
        if status != "Stopped":
            self.set_state(name, "stop", force=True)
        self.delete_instance(name)

    def ipv4_address(self, name: str, interface: str = "eth0") -> str | None:
        """The container's global IPv4 address on `interface`, or None yet."""
        return ipv4_of(self.instance_state(name), interface) or None

    # -- images ---------------------------------------------------------------

    def images(self) -> list[dict[str, Any]]:
        return self.request("GET", "/1.0/images", params={"recursion": "1"}) or []

    def image_by_alias(self, alias: str) -> dict[str, Any] | None:
        """The image an alias points at, or None when there is no such alias."""
        try:
            target = self.request("GET", f"/1.0/images/aliases/{_seg(alias)}",
                                  what=f"image {alias}")
        except NotFound:
            return None
        return self.request("GET", f"/1.0/images/{_seg(target['target'])}",
                            what=f"image {alias}")

    def delete_image(self, fingerprint: str) -> None:
        self.request("DELETE", f"/1.0/images/{_seg(fingerprint)}", what=f"image {fingerprint}")

    def rename_alias(self, alias: str, new_name: str) -> None:
        """Give an image alias another name; the image it points at stays."""
        self.request("POST", f"/1.0/images/aliases/{_seg(alias)}", {"name": new_name},
                     what=f"image alias {alias}")

    def point_alias(self, alias: str, fingerprint: str) -> None:
        """Make an existing alias point at another image, in one request (no gap)."""
        self.request("PATCH", f"/1.0/images/aliases/{_seg(alias)}", {"target": fingerprint},
                     what=f"image alias {alias}")

    def delete_alias(self, alias: str) -> None:
        self.request("DELETE", f"/1.0/images/aliases/{_seg(alias)}",
                     what=f"image alias {alias}")

    def publish(self, instance: str, *, alias: str, properties: Mapping[str, str],
                description: str = "") -> str:
        """Publish a stopped container as an image under `alias`; return its fingerprint."""
        props = {**properties, "description": description} if description else dict(properties)
        body = {"source": {"type": "instance", "name": instance}, "properties": props,
                "aliases": [{"name": alias}], "compression_algorithm": "zstd"}
        result = self.request("POST", "/1.0/images", body, what=f"container {instance}")
        return str((result or {}).get("metadata", {}).get("fingerprint", ""))

    # -- host objects (pools, networks, profiles) ---------------------------------

    def get_optional(self, path: str) -> dict[str, Any] | None:
        """GET a single object; None when it does not exist."""
        try:
            return self.request("GET", path)
        except NotFound:
            return None

    def names(self, collection: str) -> list[str]:
        """Names in a collection such as /1.0/networks, from its URL list."""
        urls = self.request("GET", collection) or []
        return [url.rstrip("/").rsplit("/", 1)[-1] for url in urls]

    def create(self, collection: str, body: Mapping[str, Any], *, what: str) -> None:
        self.request("POST", collection, dict(body), what=what)

    def push_file(self, instance: str, source: str, target: str, *, mode: str = "0644",
                  uid: int = 0, gid: int = 0) -> None:
        """Copy one host file into a container (running or stopped)."""
        self.cli(["file", "push", "--mode", mode, "--uid", str(uid), "--gid", str(gid),
                  source, f"{self.ref(instance)}{target}"])

    # -- exec: the one way coi runs a command in a container --------------------------

    def exec_argv(self, spec: ExecSpec) -> list[str]:
        """The full argv of `incus exec` for `spec`."""
        return self.cli_argv(spec._replace(instance=self.ref(spec.instance)).args())

    def exec_capture(self, spec: ExecSpec, *, timeout: float | None = None,
                     input_text: str | None = None) -> proc.Result:
        """Run to completion with text output captured; never raises on the command's
        exit status. A command Incus failed to start is tried again."""
        if self._planned(spec):
            return proc.Result(tuple(self.exec_argv(spec)), 0, "", "")
        return retry_exec(spec, lambda: self._exec(
            lambda argv: proc.run(argv, input_text=input_text, check=False, timeout=timeout),
            spec), lambda done: not done.ok and exec_not_started(done.stderr))

    def exec_logged(self, spec: ExecSpec, log_path: str) -> int:
        """Run with its output appended to a log; return its status (tried again when
        Incus failed to start it: the log then shows each try)."""
        if self._planned(spec):
            return 0

        def attempt() -> tuple[int, str]:
            offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
            status = self._exec(proc.run_logged, spec, log_path)
            with open(log_path, "rb") as log:
                log.seek(offset)
                return status, log.read(1 << 20).decode("utf-8", "replace")

        status, _ = retry_exec(spec, attempt,
                               lambda done: done[0] != 0 and exec_not_started(done[1]))
        return status

    def exec_stream(self, spec: ExecSpec, *, stdin: Any = None, stdout: Any = None,
                    stderr: Any = None) -> Any:
        """Start (no terminal) and return the running process (a subprocess.Popen) for
        the caller to stream through and wait for; stdin defaults to /dev/null. Used
        for tar streams; the caller retries with retry_exec/exec_not_started, as only
        it knows whether its stream was touched."""
        streams = {"stdout": stdout, "stderr": stderr}
        self._greet_first_run()  # the banner would land in the stream's captured stderr
        if stdin is not None:
            streams["stdin"] = stdin
        return self._exec(lambda argv: proc.spawn(argv, **streams), spec)

    def exec_handover(self, spec: ExecSpec, *, terminal: Any = None) -> int:
        """Run owning the terminal (or passing stdin/stdout/stderr through); return the
        command's exit status. A command Incus failed to start is tried again without
        showing the failure; when every try failed, Incus's words are shown."""
        if self._planned(spec):
            return 0
        self._greet_first_run()
        ended = retry_exec(spec, lambda: self._exec(
            lambda a: proc.hand_over(a, terminal=terminal, hold_prefix=b"Error: "), spec),
            lambda done: done.returncode != 0 and exec_not_started(done.held_line))
        if ended.held_line:
            sink = terminal if terminal is not None else sys.stderr.buffer
            sink.write(ended.held_line + b"\n")
            sink.flush()
        return ended.returncode

    def _planned(self, spec: ExecSpec) -> bool:
        """A --dry-run's step for this exec, named as its trace line (True: planned)."""
        return plan.step("exec", (spec.instance, *spec.command), argv=self.exec_argv(spec))

    def _exec(self, start: Callable[..., T], spec: ExecSpec, *more: Any) -> T:
        """Start `incus exec` for `spec` with `start` (a coi_common.proc function), traced
        as `exec NAME COMMAND` (the proc call under it gives only its outcome)."""
        with trace.span("exec", (spec.instance, *spec.command)):
            return self._spawn_cli(start, self.exec_argv(spec), *more)

    @staticmethod
    def _spawn_cli(start: Callable[..., T], argv: list[str], *more: Any) -> T:
        try:
            return start(argv, *more)
        except NotFound:
            raise IncusUnavailable("the incus command is not installed",
                                   hint="run 'coi setup' to install Incus") from None

    # -- CLI ----------------------------------------------------------------------

    def ref(self, name: str = "") -> str:
        """How the incus command names `name` (an instance, image or "" for the server
        itself): `REMOTE:name` on a remote, else as it is. Every CLI call that names
        an instance or a destination server goes through here."""
        if self.remote is None:
            return name or "local:"
        return f"{self.remote.name}:{name}"

    def cli_argv(self, args: Sequence[str]) -> list[str]:
        """The full argv of `incus ARGS` in our project (on a remote, the names in ARGS
        come from ref())."""
        return ["incus", "--project", self.project, *args]

    def cli(self, args: Sequence[str], *, input_text: str | None = None, check: bool = True,
            timeout: float | None = None, reads: bool = False) -> proc.Result:
        """Run `incus ARGS` in our project, mapping its failures to typed errors. A call
        that changes something (all but those marked `reads`) is a --dry-run's step."""
        if not reads and plan.step("run", self.cli_argv(args)):
            return proc.Result(tuple(self.cli_argv(args)), 0, "", "")
        try:
            return self._spawn_cli(lambda a: proc.run(a, input_text=input_text, check=check,
                                                      timeout=timeout), self.cli_argv(args))
        except CommandFailed as exc:
            raise _cli_error(exc.message) from None

    def cli_bytes(self, args: Sequence[str]) -> proc.BinaryResult:
        """Run `incus ARGS` (stdin inherited), its output kept as bytes; never raises on
        its exit status, which is the inner command's for `incus exec`."""
        self._greet_first_run()
        return self._spawn_cli(proc.run_bytes, self.cli_argv(args))

    def cli_hand_over(self, args: Sequence[str]) -> int:
        """Run `incus ARGS` owning the terminal (proc.hand_over); return its exit status."""
        self._greet_first_run()
        return self._spawn_cli(proc.hand_over, self.cli_argv(args)).returncode

    def _greet_first_run(self) -> None:
        """Let a throwaway call take the incus CLI's first-run banner.

        The first time a user runs `incus` (no client config yet) it prints a
        "To start your first container..." banner on stderr, which would land
        in the stderr of a command we pass on or capture.
        """
        conf = os.environ.get("INCUS_CONF") or os.path.join(os.path.expanduser("~"), ".config",
                                                             "incus")
        if not os.path.exists(os.path.join(conf, "config.yml")):
            with contextlib.suppress(NotFound):  # no incus: the real call says so
                proc.run(self.cli_argv(["remote", "list", "--format", "csv"]), check=False)


def name_filter(prefix: str) -> str | None:
    """Incus's filter for instance names starting with `prefix` (its filter language
    takes a value holding `^` as a regular expression), or None when there is no
    prefix or it holds characters an instance name cannot."""
    if not prefix or not FILTERABLE_PREFIX.fullmatch(prefix):
        return None
    return f"name eq ^{re.escape(prefix)}"


def ipv4_of(state: Mapping[str, Any] | None, interface: str = "eth0") -> str:
    """The global IPv4 address of `interface` in an instance state, or ""."""
    network = ((state or {}).get("network") or {}).get(interface) or {}
    for address in network.get("addresses") or []:
        if address.get("family") == "inet" and address.get("scope") == "global":
            return str(address.get("address", ""))
    return ""


class ExecSpec(NamedTuple):
    """One `incus exec`: the container, the command, as whom, where, with exactly which
    environment, and whether with a terminal (True: -t, False: -T, None: Incus decides).
    Every command coi runs in a container is described by one of these. (The records of
    the transport are NamedTuples: importing dataclasses costs a process ~15 ms.)"""

    instance: str
    command: tuple[str, ...]
    user: int | None = None
    cwd: str | None = None
    env: Mapping[str, str] = MappingProxyType({})
    tty: bool | None = None

    def args(self) -> list[str]:
        """`exec ...` arguments of the incus CLI."""
        options: list[str] = []
        if self.user is not None:
            options += ["--user", str(self.user), "--group", str(self.user)]
        if self.cwd is not None:
            options += ["--cwd", self.cwd]
        if self.tty is not None:
            options.append("-t" if self.tty else "-T")
        options += [f"--env={key}={value}" for key, value in self.env.items()]
        return ["exec", *options, self.instance, "--", *self.command]


def exec_not_started(stderr: str | bytes) -> bool:
    """Whether Incus's answer says the command never started (safe to run it again)."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    return any(marker in text for marker in EXEC_NOT_STARTED)


def retry_exec(spec: ExecSpec, attempt: Callable[[], T], not_started: Callable[[T], bool], *,
               traced_as: tuple[str, trace.Words] | None = None) -> T:
    """The one retry policy for Incus's transient exec failures: run `attempt` again,
    after a short pause, while `not_started(result)` says Incus never started the
    command, four times in all (EXEC_PAUSES); the last result is returned as it is.
    Each retry is a `retry` line of COI_TRACE naming the call as its own trace line
    does (`exec NAME COMMAND`, or `traced_as`); bench/run_loop.py counts them. With
    COI_DEBUG it is shown on stderr too."""
    kind, words = traced_as or ("exec", (spec.instance, *spec.command))
    for pause in (*EXEC_PAUSES, None):
        result = attempt()
        if pause is None or not not_started(result):
            return result
        if os.environ.get("COI_DEBUG"):
            print(f"coi: Incus did not start {spec.command[0]!r} in {spec.instance}; again "
                  f"in {pause} s", file=sys.stderr, flush=True)
        trace.retry(kind, words, pause, "Incus did not start it")
        time.sleep(pause)
    raise AssertionError("unreachable")


def _cli_error(message: str) -> Exception:
    lower = message.lower()
    if "not found" in lower:
        return NotFound(message)
    if "permission denied" in lower:
        return PermissionDenied(message, hint=JOIN_GROUP_HINT)
    if "unix.socket" in lower or ("daemon" in lower and "running" in lower):
        return IncusUnavailable(message, hint=START_HINT)
    return _error_for(0, message, "")


def _seg(name: str) -> str:
    """One URL path segment; names are validated elsewhere, this keeps '/' out regardless."""
    return quote(name, safe="")


def connect(config: Any = None) -> Incus:
    """A client set up from the effective config's [incus] section (socket, project,
    remote: one of the incus client's remotes, over HTTPS)."""
    if config is None:
        return Incus()
    remote = config.get("incus.remote")
    return Incus(socket=config.get("incus.socket"), project=config.get("incus.project"),
                 remote=remotes.find(remote) if remote else None,
                 target=config.get("incus.target"))
