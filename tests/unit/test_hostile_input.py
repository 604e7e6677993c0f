"""Hostile input to every executable (issue #11, item 8): random and adversarial command
lines and stdin, generated with hypothesis (fixed seed, bounded examples).

Every input here is invalid by construction, so the one right answer is a refusal:
exit status 2 (usage error or bad input), a message on stderr without traceback or
"internal error" and without raw control characters, nothing on stdout but a JSON
error record, and nothing done.

"Nothing done" is enforced, not hoped for. The in-process runs call each executable's
main() under a fence made of an audit hook (sys.addaudithook): while main() runs,
starting a program, exec, opening any socket (Incus, the host service, DNS, netlink)
and creating, writing, renaming, removing or chmod-ing a file are refused and
recorded, and a recorded attempt fails the test with the event that was tried. So a
refusal must come before any of that. The runs from outside (bin/coi in a subprocess)
have no fence: Incus and the host service are pointed at sockets that do not exist,
and the test compares its directories before and after.

What may be written: nothing. HOME, XDG_CONFIG_HOME, TMPDIR and the working directory
(the workspace) are the test's own temporary directories (coi_env), and every file and
directory in them must be as it was. The last test asks the real Incus that no instance
or image of these tests exists.

Left out on purpose: `--help`, `-h`, `--version`, `-V` and `--debug` (valid anywhere; --debug
prints tracebacks by design), NUL (no argv can hold it), and inputs whose right answer
is not "bad input": a well-formed name of something that does not exist is "not found"
(exit 3), and `exists`/`running` answer a malformed name with exit 1 and no output, as
documented ("a name that is not valid never exists"). The
regressions at the end name the patch that closed each gap the properties found.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import json
import operator
import os
import pkgutil
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import pexpect
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import coi_common
from coi_common import entry, naming, plumbing
from coi_common.commands import BY_NAME
from coi_common.errors import EXIT_USAGE
from coi_common.plumbing import read_records as plumbing_records

ROOT = Path(__file__).resolve().parents[2]
PACKAGES: Final = {"coi": "coi_dispatch", "coi-host": "coi_host",
                   "coi-image": "coi_image", "coi-shell": "coi_shell", "coi-slot": "coi_slot",
                   "coi-container": "coi_container", "coi-session": "coi_session",
                   "coi-net": "coi_net"}
NAME: Final = "coi-test-hostile-1"
"""A well-formed container name, beside the one bad value of a command line."""
IMAGE: Final = "coi-test-hostile-img"
SESSION: Final = "20260101-000000-0123456789ab"
MARK: Final = "coi-test-hostile"
"""No Incus instance or image alias may ever contain this (the last test checks)."""
A_FILE: Final = "notes.txt"
"""A regular file in the workspace: a workspace, build script or push source."""

EXAMPLES: Final[collections.Counter[str]] = collections.Counter()
"""How many examples each property ran; printed at the end of the module."""


def bounded(examples: int) -> settings:
    # One temporary HOME per property on purpose: every example must leave it as it
    # was, so examples sharing it is part of what is checked.
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])


def _import_everything() -> dict[str, Any]:
    """Every coi module imported up front, so no import happens inside the fence (a
    first import may write a bytecode cache, which the fence would refuse)."""
    mains = {}
    for program, name in PACKAGES.items():
        module = importlib.import_module(name)
        mains[program] = module
        for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
            if info.name != "__main__":  # importing it runs main()
                importlib.import_module(f"{name}.{info.name}")
    for info in pkgutil.iter_modules(coi_common.__path__):
        importlib.import_module(f"coi_common.{info.name}")
    importlib.import_module("docopt")
    return mains


MODULES: Final = _import_everything()


# -- the fence -------------------------------------------------------------------------------


class Breach(BaseException):
    """An executable tried to act while it should be refusing. A BaseException, so the
    entry wrapper's `except Exception` cannot turn it into an error line."""


FENCED: Final = frozenset({
    "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.system", "pty.spawn", "os.kill", "os.killpg",
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.chflags", "os.lchmod", "os.truncate", "os.utime",
    "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr", "shutil.rmtree",
    "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move",
    "tempfile.mkstemp", "tempfile.mkdtemp",
})
WRITE_FLAGS: Final = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
FENCE: Final[dict[str, Any]] = {"up": False, "tried": []}


def _opens_for_writing(args: tuple[Any, ...]) -> bool:
    path, mode, flags = (*args, None, None, None)[:3]
    if isinstance(path, int):  # an fd it already holds (stdout, say): nothing is made
        return False
    return (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
        (isinstance(flags, int) and bool(flags & WRITE_FLAGS))


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not FENCE["up"]:
        return
    if event in FENCED or (event == "open" and _opens_for_writing(args)):
        what = f"{event} {args!r}"[:300]
        FENCE["tried"].append(what)
        raise Breach(what)


sys.addaudithook(_audit)  # stays for the process; does nothing while the fence is down


@contextlib.contextmanager
def fenced() -> Iterator[list[str]]:
    """The fence up for the block; yields the list of what was tried."""
    FENCE["tried"] = tried = []
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    FENCE["up"] = True
    try:
        yield tried
    finally:
        FENCE["up"] = False
        sys.dont_write_bytecode = saved


# -- running main() in-process ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one run left: exit status, stdout, stderr, and what the fence stopped."""

    argv: tuple[str, ...]
    status: object
    out: str
    err: str
    tried: tuple[str, ...]


class _Exec(BaseException):
    """The dispatcher replacing itself with an owner: continued in this process."""

    def __init__(self, path: str, argv: Sequence[str]) -> None:
        super().__init__(path)
        self.path, self.argv = path, list(argv)


def _exec_in_process(path: str, argv: Sequence[str]) -> None:
    raise _Exec(path, argv)


def _streams() -> tuple[io.BytesIO, io.BytesIO, IO[str], IO[str]]:
    """stdout and stderr as Python sets them up in a UTF-8 locale (stdout strict,
    stderr backslashreplace), over memory."""
    out, err = io.BytesIO(), io.BytesIO()
    return (out, err,
            io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True),
            io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace",
                             write_through=True))


class _ChildInProcess:
    """plumbing.Child (coi-shell running coi-slot next) as its main() in this process,
    under the fence, when it is finished; its records come back as the real ones do."""

    def __init__(self, program: str, args: Sequence[str], *, kind: Any = None,
                 **_how: Any) -> None:
        self.program, self.args, self.kind, self.given = program, list(args), kind, None

    def give(self, record: Any) -> None:
        self.given = record

    def finish(self, record: Any = None) -> list[dict[str, Any]]:
        return _child_in_process(self.program, self.args,
                                 record=record if self.given is None else self.given,
                                 kind=self.kind)

    def abandon(self) -> None:
        """Nothing runs until finish()."""


def _child_in_process(program: str, args: Sequence[str], *, record: Any = None,
                      kind: Any = None) -> list[dict[str, Any]]:
    """A coi child as its main() in this process, still under the fence; its records
    come back as the real call reads them."""
    out = io.BytesIO()
    saved = sys.stdin, sys.stdout, dict(entry._PLUMBING)
    os.environ[entry.PLUMBING_VARIABLE] = "1"  # as plumbing.call starts it
    sys.stdin = io.StringIO(json.dumps(record) + "\n" if record is not None else "")
    sys.stdout = child_out = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    try:
        MODULES[program].main([*args, "--format", "json"])
        code: Any = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.stdin, sys.stdout = saved[0], saved[1]
        entry._PLUMBING.update(saved[2])
    written = out.getvalue()
    child_out.detach()
    return plumbing_records(program, written, int(code), kind)


def run_main(program: str, argv: Sequence[str], stdin: IO[str]) -> Outcome:
    """`program argv` through its main() under the fence. The dispatcher's exec of an
    owner runs that owner's main() next, as the exec would; a plumbing child runs its
    main() in here too (_child_in_process)."""
    out, err, sys_out, sys_err = _streams()
    saved = (sys.stdin, sys.stdout, sys.stderr, dict(os.environ),
             signal.getsignal(signal.SIGTERM), os.execv, plumbing.Child)
    status: object = "main() returned"
    tried: list[str] = []
    name, args = program, list(argv)
    try:
        sys.stdin, sys.stdout, sys.stderr = stdin, sys_out, sys_err
        os.execv = _exec_in_process
        plumbing.Child = _ChildInProcess
        while True:
            try:
                with fenced() as attempts:
                    try:
                        MODULES[name].main(list(args))
                    finally:
                        tried += attempts
            except SystemExit as exc:
                status = 0 if exc.code is None else exc.code
            except _Exec as exc:
                name, args = os.path.basename(exc.path), exc.argv[1:]
                if name in MODULES:
                    continue
                status = f"exec of {exc.path}"
            except Breach:
                status = "stopped by the fence"
            break
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved[0], saved[1], saved[2]
        os.environ.clear()
        os.environ.update(saved[3])
        signal.signal(signal.SIGTERM, saved[4])
        os.execv, plumbing.Child = saved[5], saved[6]
    return Outcome(tuple(argv), status, out.getvalue().decode("utf-8", "replace"),
                   err.getvalue().decode("utf-8", "replace"), tuple(tried))


CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
"""Characters an error line must not carry raw: terminal escapes, bidi overrides."""
"""What config's quoting still leaves raw (AWAITING_PATCH)."""


def assert_refused(outcome: Outcome, status: int = EXIT_USAGE) -> None:
    """The one right answer to hostile input: refused, said once, nothing done."""
    shown = f"{list(outcome.argv)!r}"[:400]
    assert not outcome.tried, f"{shown} tried to act: {outcome.tried[0]}"
    assert outcome.status == status, f"{shown}: exit {outcome.status!r}\n{outcome.err}"
    assert "Traceback" not in outcome.err, f"{shown}:\n{outcome.err}"
    assert "internal error" not in outcome.err, f"{shown}:\n{outcome.err}"
    assert not CONTROL.search(outcome.err), f"{shown}: raw control character in {outcome.err!r}"
    if status == EXIT_USAGE:
        assert outcome.err.strip(), f"{shown}: refused without saying why"
    for line in outcome.out.splitlines():
        record = json.loads(line)
        assert (record["kind"], record["exit_code"]) == ("error", status), f"{shown}: {line}"


# -- the environment -------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root (root too) with its mode, size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for path in (Path(folder), *(Path(folder, name) for name in files + dirs)):
            info = path.lstat()
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size,
                                                  info.st_mtime_ns)
    return found


@dataclass
class Hostile:
    """The isolated environment of one property, and its ways to run things."""

    root: Path
    workspace: Path
    stdin_path: Path
    """Outside root: the hostile stdin of an example is not something coi wrote."""
    terminal: int
    before: dict[str, tuple[int, int, int]]

    def stdin(self, data: bytes | None) -> IO[str]:
        """stdin as Python opens it: /dev/null for None, else a file holding `data`."""
        if data is None:
            return open(os.devnull, encoding="utf-8")
        self.stdin_path.write_bytes(data)
        return open(self.stdin_path, encoding="utf-8")

    def run(self, program: str, argv: Sequence[str], *, data: bytes | None = None,
            on_terminal: bool = False) -> Outcome:
        """main() of `program` in-process; stdin /dev/null, `data`, or a terminal."""
        if on_terminal:
            stdin = open(self.terminal, encoding="utf-8", closefd=False)  # noqa: SIM115
        else:
            stdin = self.stdin(data)
        with stdin:
            return run_main(program, argv, stdin)

    def assert_untouched(self) -> None:
        after = _tree(self.root)
        changed = sorted(set(after.items()) ^ set(self.before.items()))
        assert not changed, f"written under the test's HOME or workspace: {changed[:5]}"


PREFIXES: Final[list[str]] = []
"""The container prefixes these tests ran under, for the last test."""


@pytest.fixture
def hostile(coi_env, tmp_path, monkeypatch) -> Iterator[Hostile]:
    """coi_env (own HOME, XDG_CONFIG_HOME, system config, prefix, nft table), run from
    its own workspace, with Incus and the host service at sockets that do not exist, and
    a terminal (a pty) for commands that want one on stdin."""
    workspace = coi_env.root / "workspace"
    workspace.mkdir()
    (workspace / A_FILE).write_text("a regular file\n")
    (coi_env.root / "tmp").mkdir()
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("INCUS_SOCKET", str(coi_env.root / "no-incus.socket"))
    monkeypatch.setenv("INCUS_DIR", str(coi_env.root / "no-incus"))
    monkeypatch.setenv("COI_HOST_SOCKET", str(coi_env.root / "no-host.sock"))
    monkeypatch.setenv("COI_BIN_DIR", str(ROOT / "bin"))
    monkeypatch.setenv("TMPDIR", str(coi_env.root / "tmp"))
    PREFIXES.append(coi_env.prefix)
    controller, terminal = os.openpty()
    try:
        yield Hostile(coi_env.root, workspace, tmp_path / "stdin", terminal,
                      _tree(coi_env.root))
    finally:
        os.close(terminal)
        os.close(controller)


@pytest.fixture(scope="module", autouse=True)
def _print_example_counts(request) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin(
        "capturemanager")
    if reporter is None or capture is None or not EXAMPLES:
        return
    counts = ", ".join(f"{name} {count}" for name, count in sorted(EXAMPLES.items()))
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line(f"\nhostile input: {sum(EXAMPLES.values())} examples ({counts})")


# -- hostile text ------------------------------------------------------------------------------


SPECIAL: Final = (
    "", " ", "  ", "-", "--", "---", "-1", "+1", "0", "00", "01", " 1", "1 ", "1.5", "1e9",
    "0x10", "1_0", "\u0661\u0662", "\u00b2", "\uff11", "9" * 19, "9" * 30, "-" + "9" * 30,
    "9" * 5000, "NaN", "inf", "-inf", "null", "true", "None", "{}", "[]", "..", "../..",
    "../../../../etc/passwd", "/", "//", "/etc", "/root", "/dev/zero", "/proc/self/environ",
    "~", "~root", "~/.ssh", ".", "$HOME", "${IFS}", "*", "?", "[", "$(id)", "`id`", ";id",
    "|id", "&&id", "'", '"', "\\", "%s%n%x", "{0}", "\x1b[31mred", "\x1b]0;title\x07",
    "\r", "\n", "\t", "a\nb", "\x7f", "\u202ecoi", "\u200b", "\ufeff", "\udcff", "\udc80abc",
    "=", "==", "a=", "=b", "A=1\nB=2", ":", "::", "a:b", "a:b:c:d", ".:/x:rw", "/:/host",
    "\U0001f642", "\uff43\uff4f\uff49", "e\u0301", "\u0130", "ǅ", "ß",
)
SURROGATE_ESCAPES: Final = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)
"""What undecodable bytes of a real argv become in Python (surrogateescape)."""
CHARACTERS: Final = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
    st.characters(min_codepoint=1, max_codepoint=0x1F), SURROGATE_ESCAPES,
    st.sampled_from("-=:/.~_ "))
LONG: Final = st.builds(operator.mul, st.sampled_from(["a", "9", "/", "-", "é", "../", "🙂"]),
                        st.integers(256, 20000))


def _asks_for_help(token: str) -> bool:
    """--help, -h, --version (-V, coi's) and --debug (or a prefix docopt would take for
    one)."""
    if token == "--" or not token.startswith("-") or len(token) < 2:
        return False
    if token.startswith("--"):
        name = token[2:].split("=", 1)[0]
        return not name or any(word.startswith(name) for word in ("help", "version", "debug"))
    return "h" in token[1:] or "V" in token[1:]


TEXT: Final = st.one_of(st.sampled_from(SPECIAL), st.text(CHARACTERS, max_size=24), LONG,
                        st.integers(-(2**70), 2**70).map(str)).filter(
    lambda token: not _asks_for_help(token))
"""Hostile argv words: specials, random unicode, control characters, huge numbers."""


def bad(valid: Callable[[str], bool], *near_misses: str) -> st.SearchStrategy[str]:
    """Hostile words (and near misses) that `valid` rejects: invalid by construction."""
    return st.one_of(TEXT, st.sampled_from(near_misses or ("",))).filter(
        lambda value: not _asks_for_help(value) and not valid(value))


def matches(pattern: str, test: Callable[[str], bool] = lambda value: True
            ) -> Callable[[str], bool]:
    compiled = re.compile(pattern, re.ASCII)
    return lambda value: bool(compiled.fullmatch(value)) and test(value)


# What each value may be, written from the usage texts and docs (not from the code):
CONTAINER_OK = matches(r"[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
IMAGE_OK = matches(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", lambda v: ".." not in v)
SESSION_OK = matches(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TOOL_OK = matches(r"[a-z][a-z0-9_-]{0,31}")
DEVICE_OK = matches(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SLOT_OK = matches(r"0|[1-9][0-9]{0,5}", lambda v: int(v) <= naming.DEFAULT_MAX_SLOTS)
SLOT_GIVEN_OK = matches(r"[1-9][0-9]{0,5}", lambda v: int(v) <= naming.SLOT_CEILING)
FORMAT_OK = matches(r"text|json")
MODE_OK = matches(r"restricted|allowlist|open")
TIMEOUT_OK = matches(r"[0-9]{1,6}")
SESSION_KEEP_OK = matches(r"0|[1-9][0-9]{0,5}")
IMAGE_KEEP_OK = matches(r"[0-9]{1,9}", lambda v: int(v) >= 1)
DURATION_OK = matches(r"[1-9][0-9]{0,5}[smhdw]", lambda v: int(v[:-1]) * {
    "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[v[-1]] <= 366_000 * 86400)
UID_OK = matches(r"0|[1-9][0-9]{0,9}", lambda v: int(v) <= 2**32 - 2)
PUSH_ID_OK = matches(r"[0-9]{1,10}", lambda v: int(v) <= 2**32 - 2)
FILE_MODE_OK = matches(r"0?[0-7]{3}")
CPU_OK = matches(r"[1-9][0-9]{0,3}")
MEMORY_OK = matches(r"[1-9][0-9]{0,6}(MiB|GiB|MB|GB)|([1-9][0-9]?|100)%")
DNS_TIMEOUT_OK = matches(r"[0-9]{1,2}(\.[0-9]{1,3})?", lambda v: 0.1 <= float(v) <= 30)
REFRESH_OK = matches(r"0|[1-9][0-9]{0,4}", lambda v: int(v) <= 10080)
VARIABLE_PAIR_OK = matches(r"[A-Za-z_][A-Za-z0-9_]*=.*", lambda v: True)


def int_text_ok(low: int, high: int) -> Callable[[str], bool]:
    """An integer flag as config reads one: optional sign, digits, spaces around."""
    def valid(value: str) -> bool:
        word = value.strip()
        return bool(re.fullmatch(r"[+-]?[0-9]{1,18}", word, re.ASCII)) and \
            low <= int(word) <= high
    return valid


def env_ok(value: str) -> bool:
    """--env K=V: K letters, digits and _, not starting with a digit."""
    key, sep, _ = value.partition("=")
    return bool(sep) and bool(key) and not key[0].isdigit() and \
        key.replace("_", "a").isalnum()


def mount_ok(value: str) -> bool:
    """SRC:DST or SRC:DST:ro, DST absolute without '..' (SRC is always '.' here)."""
    parts = value.split(":")
    return len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "ro") and \
        parts[1].startswith("/") and ".." not in parts[1].split("/")


def base_ok(value: str) -> bool:
    for prefix in ("bootstrap:", "images:"):
        if value.startswith(prefix):
            distro, _, release = value[len(prefix):].partition("/")
            part = r"[a-z0-9][a-z0-9.]{0,31}"
            return bool(re.fullmatch(part, distro) and re.fullmatch(part, release))
    return IMAGE_OK(value)


def remote_ok(value: str) -> bool:
    name, colon, path = value.partition(":")
    return bool(colon) and CONTAINER_OK(name) and path.startswith("/")


def resolver_ok(value: str) -> bool:
    import ipaddress  # noqa: PLC0415

    host, port = value.strip(), "53"
    bracketed = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::([0-9]+))?", host)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2) or "53"
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return bool(re.fullmatch(r"[1-9][0-9]{0,4}", port)) and int(port) <= 65535


def allow_maybe_ok(value: str) -> bool:
    """Anything that could be a domain or an IPv4 address (only LDH characters and
    dots) counts as valid: the property uses only entries that cannot be either."""
    word = value.strip(" ")
    return bool(word) and bool(re.fullmatch(r"[A-Za-z0-9.-]+", word)) and \
        not re.fullmatch(r"[0-9.]+", word)


PRIVATE_ADDRESSES: Final = ("10.0.0.1", "127.0.0.1", "169.254.169.254", "172.16.0.1",
                            "192.168.1.1", "100.64.0.1", "0.0.0.0", "224.0.0.1")

BAD_NAME = bad(CONTAINER_OK, "a-", "-a", "1a", "a_b", "a.b", "a" * 64, NAME + "-", "ÄBC")
BAD_IMAGE = bad(IMAGE_OK, "..", "a..b", "-a", ".a", "a/b", "a:b", "a" * 129)
BAD_SESSION = bad(SESSION_OK, "-a", "_a", "a.b", "../" + SESSION, "a" * 65)
BAD_TOOL = bad(TOOL_OK, "Claude", "1tool", "-x", "a" * 33, "../claude")
BAD_DEVICE = bad(DEVICE_OK, "-d", ".d", "a/b", "a" * 65)
BAD_FORMAT = bad(FORMAT_OK, "JSON", "yaml", "csv", "table", "raw", "json ")
BAD_MODE = bad(MODE_OK, "Restricted", "closed", "none", "allow")
BAD_TIMEOUT = bad(TIMEOUT_OK, "-1", "1.5", "1234567", "1e3", "60s")
BAD_SESSION_KEEP = bad(SESSION_KEEP_OK, "-1", "01", "1234567", "+3")
BAD_IMAGE_KEEP = bad(IMAGE_KEEP_OK, "0", "00", "-1", "1234567890", "+3")
BAD_DURATION = bad(DURATION_OK, "0d", "1y", "1.5h", "d", "-1d", "1 d", "1D", "1234567d",
                   "30", "01d")
BAD_UID = bad(UID_OK, "-1", "01", "4294967295", "99999999999", "1000 ", "root")
BAD_PUSH_ID = bad(PUSH_ID_OK, "-1", "4294967295", "99999999999", "code")
BAD_FILE_MODE = bad(FILE_MODE_OK, "0888", "644x", "7777", "u+x", "00644", "-644")
BAD_CWD = bad(lambda v: v.startswith("/"), "workspace", "./x", "~/x")
BAD_CPU = bad(lambda v: v == "" or CPU_OK(v), "0", "-1", "1.5", "10000", "all")
BAD_MEMORY = bad(lambda v: v == "" or MEMORY_OK(v), "0", "512", "512mib", "0MiB", "101%",
                 "0%", "1TiB", "-1GiB")
"""Empty is valid for --cpu and --memory: no limit (limits.cpu, limits.memory)."""
BAD_PROCESSES = bad(int_text_ok(0, 1_000_000),
                    "-1", "1000001", "1.5", "many")
"""More than 4000 characters left out: AWAITING_PATCH (config's integers)."""
BAD_DNS_TIMEOUT = bad(DNS_TIMEOUT_OK, "0", "0.05", "31", "99", "1e1", "-1")
BAD_REFRESH = bad(REFRESH_OK, "-1", "10081", "01", "99999")
BAD_ENV = bad(lambda v: env_ok(v) or not v.partition("=")[0].isascii(),
              "A", "=1", "1A=2", "A B=1", "A-B=1", "A.B=1", "$A=1", "A\n=1")
BAD_VARIABLE_PAIR = bad(VARIABLE_PAIR_OK, "A", "=1", "1A=2", "A B=1", "A-B=1", "é=1")
BAD_MOUNT = st.one_of(
    bad(lambda v: ":" in v),
    bad(lambda v: mount_ok("." + ":" + v), "rel", "./x", "x:ro", "/a/../b", "/..", "/x:rw",
        "/x:ro:ro", "/x::").map(lambda v: f".:{v}"),
).filter(lambda v: not mount_ok(v))
BAD_BASE = bad(base_ok, "bootstrap:", "bootstrap:debian", "bootstrap:Debian/bookworm",
               "images:ubuntu/", "images:/24.04", "images:ubuntu/24.04/x", "a..b", "-x")
BAD_REMOTE = bad(remote_ok, NAME, f"{NAME}:", f"{NAME}:rel", ":/x", "bad name:/x",
                 f"{NAME}-:/x", "-x:/x")
BAD_RESOLVER = bad(resolver_ok, "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:99999", "01.2.3.4",
                   "1.2.3", "::1:53", "[::1]:x", "dns.google", "1.2.3.4:")
BAD_ALLOW = st.one_of(bad(allow_maybe_ok, " ", "a_b.com", "*.github.com", "https://x.com",
                          "::1", "[::1]", "a b.com"),
                      st.sampled_from(PRIVATE_ADDRESSES))
BAD_WORKSPACE = st.sampled_from(["", A_FILE, f"./{A_FILE}", f"{A_FILE}/"])
BAD_PREFIX = st.sampled_from(["", " ", "  ", "\t", "\n", " \t "])
BAD_PROFILE = bad(lambda v: False, "default", "rust", "coi")
"""No profile exists in the test's empty config, so every name is unknown."""


# -- command lines with one bad value ----------------------------------------------------------

Part = str | st.SearchStrategy[str]
Line = tuple[Part, ...]


def argv_of(parts: Line) -> st.SearchStrategy[list[str]]:
    return st.tuples(*(p if isinstance(p, st.SearchStrategy) else st.just(p)
                       for p in parts)).map(list)


def opt(flag: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`--flag=VALUE`: the value can never be taken for another option."""
    return values.map(lambda value: f"{flag}={value}")


SHELL_FLAG = st.one_of(
    opt("--slot", bad(SLOT_OK, "11", "999", "1000000", "-1", "+1", "01", " 1", "\uff11")),
    opt("--image", BAD_IMAGE), opt("--tool", BAD_TOOL),
    opt("--network", BAD_MODE),
    opt("--cpu", BAD_CPU), opt("--memory", BAD_MEMORY),
    opt("--processes", BAD_PROCESSES),
    opt("--env", BAD_ENV), opt("--mount", BAD_MOUNT), opt("--profile", BAD_PROFILE),
    opt("--workspace", BAD_WORKSPACE),
)
"""One bad flag of `coi shell`/`coi run`."""

VALUE_LINES: Final[dict[str, tuple[Line, ...]]] = {
    "coi-slot": (
        ("next", opt("--slot", bad(SLOT_OK, "11", "-1", "01", " 1", "+1", "1.0"))),
        ("next", opt("--image", BAD_IMAGE)), ("next", opt("--env", BAD_ENV)),
        ("next", opt("--workspace", BAD_WORKSPACE)), ("next", opt("--profile", BAD_PROFILE)),
        ("next", "--persistent", opt("--format", BAD_FORMAT)),
        ("list", "--all", opt("--format", BAD_FORMAT)),
        ("kill", BAD_NAME), ("kill", NAME, BAD_NAME, "--no-save"),
        ("kill", "--all", "--force", opt("--format", BAD_FORMAT)),
        # --all and clean ask first; without a terminal and --force that is refused.
        ("kill", "--all"), ("shutdown", "--all"), ("persist", "--all"), ("clean",),
        ("shutdown", BAD_NAME), ("shutdown", NAME, opt("--timeout", BAD_TIMEOUT)),
        ("persist", BAD_NAME), ("clean", "--force", opt("--format", BAD_FORMAT)),
    ),
    "coi-shell": (
        ("run", SHELL_FLAG, "--", "true"),
        ("run", SHELL_FLAG, SHELL_FLAG, "--", "sh", "-c", "exit 0"),
        ("shell", SHELL_FLAG), ("shell", opt("--session", BAD_SESSION)),
        ("shell", "--resume", opt("--session", BAD_SESSION)),
        (opt("--resume", BAD_SESSION.filter(bool)),),
        ("tmux", "send", BAD_NAME, TEXT), ("tmux", "capture", BAD_NAME),
        ("tmux", "list", opt("--format", BAD_FORMAT)),
    ),
    "coi-session": (
        ("save", BAD_NAME), ("session", "save", BAD_NAME),
        ("restore", BAD_SESSION, NAME), ("restore", SESSION, BAD_NAME),
        ("show", BAD_SESSION), ("session", "delete", BAD_SESSION), ("delete", BAD_SESSION),
        ("info", BAD_SESSION), ("list", opt("--tool", BAD_TOOL)),
        ("latest", opt("--tool", BAD_TOOL)), ("list", opt("--workspace", BAD_WORKSPACE)),
        ("latest", opt("--workspace", BAD_WORKSPACE)),
        ("prune", opt("--keep", BAD_SESSION_KEEP)),
        ("prune", opt("--older-than", BAD_DURATION)),
        ("session", "prune", "--all", opt("--older-than", st.sampled_from(
            ["999999w", "999999d", "99999w", "366001d", "52286w"]))),
        ("session", "list", "--all", opt("--format", BAD_FORMAT)),
    ),
    "coi-net": (
        ("apply", BAD_NAME, "--dry-run"),
        ("network", "apply", NAME, opt("--mode", BAD_MODE), "--dry-run"),
        ("apply", NAME, "--mode=allowlist", opt("--allow", BAD_ALLOW), "--dry-run"),
        ("apply", NAME, opt("--resolver", BAD_RESOLVER), "--dry-run"),
        ("apply", NAME, opt("--refresh-minutes", BAD_REFRESH), "--dry-run"),
        ("apply", NAME, opt("--dns-timeout", BAD_DNS_TIMEOUT), "--dry-run"),
        ("apply", NAME, opt("--format", BAD_FORMAT), "--dry-run"),
        ("remove", BAD_NAME, "--dry-run"), ("network", "remove", NAME, BAD_NAME),
        ("refresh", BAD_NAME), ("status", BAD_NAME),
        ("network", "status", opt("--format", BAD_FORMAT)),
        ("gc", "--dry-run", opt("--format", BAD_FORMAT)),
    ),
    "coi-container": (
        ("container", "launch", BAD_IMAGE, NAME),
        ("container", "launch", IMAGE, BAD_NAME, "--ephemeral"),
        ("container", "start", BAD_NAME), ("container", "stop", BAD_NAME, "--force"),
        ("container", "delete", BAD_NAME), ("container", "exec", BAD_NAME, "--", "true"),
        ("container", "exec", NAME, opt("--user", BAD_UID), "--", "id"),
        ("container", "exec", NAME, opt("--group", BAD_UID), "--", "id"),
        ("container", "exec", NAME, opt("--env", BAD_VARIABLE_PAIR), "--", "env"),
        ("container", "exec", NAME, opt("--cwd", BAD_CWD), "--", "pwd"),
        ("container", "exec", NAME, "--capture",
         opt("--format", BAD_FORMAT.filter(lambda v: v != "raw")), "--", "pwd"),
        ("container", "exec", NAME, opt("--format", st.sampled_from(["json", "raw"])),
         "--", "pwd"),
        ("container", "exec", NAME, "--"), ("container", "exec", NAME, "true"),
        ("container", "mount", BAD_NAME, "dev", ".", "/x"),
        ("container", "mount", NAME, BAD_DEVICE, ".", "/x"),
        ("container", "mount", NAME, "dev", st.sampled_from(["", A_FILE]), "/x"),
        ("container", "mount", NAME, "dev", ".", BAD_CWD),
        ("file", "push", opt("--uid", BAD_PUSH_ID), A_FILE, f"{NAME}:/x"),
        ("file", "push", opt("--gid", BAD_PUSH_ID), A_FILE, f"{NAME}:/x"),
        ("file", "push", opt("--mode", BAD_FILE_MODE), A_FILE, f"{NAME}:/x"),
        ("file", "push", A_FILE, BAD_REMOTE), ("file", "push", "-r", ".", BAD_REMOTE),
        ("file", "push", "", f"{NAME}:/x"),
        ("file", "pull", BAD_REMOTE, "."), ("file", "pull", "-r", BAD_REMOTE, "out"),
    ),
    "coi-image": (
        ("build", opt("--base", BAD_BASE)), ("build", "--force", opt("--base", BAD_BASE)),
        ("build", opt("--format", BAD_FORMAT)),
        ("build", "custom", BAD_IMAGE, f"--script={A_FILE}"),
        ("build", "custom", IMAGE, opt("--script", st.sampled_from(["", ".", "/"]))),
        ("build", "custom", IMAGE, f"--script={A_FILE}", opt("--base", BAD_BASE)),
        ("image", "publish", BAD_NAME, IMAGE), ("image", "publish", NAME, BAD_IMAGE),
        ("image", "delete", BAD_IMAGE), ("image", "cleanup", BAD_PREFIX, "--keep=1"),
        ("image", "cleanup", "coi-test-", opt("--keep", BAD_IMAGE_KEEP)),
        ("image", "list", opt("--format", BAD_FORMAT)),
    ),
    "coi-host": (
        ("setup", opt("--format", BAD_FORMAT)), ("doctor", opt("--format", BAD_FORMAT)),
        ("config", "show", opt("--profile", BAD_PROFILE)),
        ("config", "show", opt("--workspace", BAD_WORKSPACE)),
        ("config", "show", opt("--format", BAD_FORMAT)),
        ("trust", opt("--workspace", BAD_WORKSPACE)),
        ("trust", "--show", opt("--workspace", BAD_WORKSPACE)),
        ("trust", "--revoke", opt("--format", BAD_FORMAT)),
    ),
}
VALUE_LINES["coi"] = (
    # The dispatcher's own commands, then every owner line that starts with a coi command.
    ("version", opt("--format", BAD_FORMAT)),
    ("help", BAD_NAME.filter(lambda v: v not in BY_NAME)),
    ("help", st.sampled_from(sorted(BY_NAME)), TEXT),
    ("completion", TEXT), (TEXT.filter(lambda v: v not in BY_NAME),),
    *(parts for owner, lines in VALUE_LINES.items() for parts in lines
      if isinstance(parts[0], str) and parts[0] in BY_NAME
      and BY_NAME[parts[0]].owner == owner),
)
NOT_AN_OPTION = re.compile(r"[^-]").match
"""A word docopt takes for a name, not an option (an option is a usage error)."""
QUERY_LINES: Final[dict[str, tuple[Line, ...]]] = {
    "coi-container": (("container", "exists", BAD_NAME.filter(NOT_AN_OPTION)),
                      ("container", "running", BAD_NAME.filter(NOT_AN_OPTION))),
    "coi-image": (("image", "exists", BAD_IMAGE.filter(NOT_AN_OPTION)),),
}
"""Documented: a malformed name never exists, so the answer is exit 1, nothing printed."""


# -- garbage command lines ---------------------------------------------------------------------


UNKNOWN_OPTION: Final = "--zz-hostile"
"""No usage has an option starting with --zz, so a line holding it can never parse."""


def usage_words(doc: str) -> tuple[list[tuple[str, ...]], list[str]]:
    """The command words each usage pattern starts with, and every option of the doc."""
    body = re.search(r"Usage:(.*?)(\n\s*\n|\Z)", doc, re.S).group(1)
    program = body.split()[0]
    leads = []
    for pattern in re.split(rf"(?m)^\s*{re.escape(program)}\b", body)[1:]:
        words = []
        for token in pattern.split():
            word = re.fullmatch(r"\[?([a-z][a-z0-9-]*)\]?", token)
            if word is None:
                break
            words.append(word.group(1))
        leads.append(tuple(words))
    options = sorted(set(re.findall(r"(?<![\w-])(--?[a-zA-Z][a-zA-Z0-9-]*)", doc))
                     - {"-h", "--help", "-V", "--version", "--debug"})
    return leads, options


def _with_unknown_option(words: list[str], where: int, value: str) -> list[str]:
    end = words.index("--") if "--" in words else len(words)
    bad_option = UNKNOWN_OPTION + (f"={value}" if where % 3 == 0 else "")
    return [*words[:where % (end + 1)], bad_option, *words[where % (end + 1):]]


def garbage_line(program: str) -> st.SearchStrategy[list[str]]:
    """The program's real command words and options, mixed with hostile words, plus one
    option no usage has, placed anywhere before `--`."""
    leads, options = usage_words(MODULES[program].__doc__)
    words = sorted({w for lead in leads for w in lead})
    if program == "coi":
        leads += [(name,) for name in BY_NAME]
        words += sorted(BY_NAME)
    kinds = [TEXT, st.sampled_from(words)]
    if options:  # the dispatcher has none but those left out
        kinds += [st.sampled_from(options),
                  st.builds(lambda o, v: f"{o}={v}", st.sampled_from(options), TEXT)]
    word = st.one_of(*kinds)
    return st.builds(lambda lead, rest, where, value: _with_unknown_option(
        [*lead, *rest], where, value), st.sampled_from([(), *leads]),
        st.lists(word, max_size=7), st.integers(0, 1000), TEXT)


# -- records and bytes on stdin ------------------------------------------------------------------


REQUIRED: Final = ("workspace", "slot", "container", "persistent", "image", "profile")
JSON_VALUES: Final = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
NOT_A_NAME: Final = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.lists(st.text(max_size=3), max_size=2),
                              st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                              max_size=2))
FIELD_DAMAGE: Final = st.one_of(
    st.tuples(st.just("coi"), st.one_of(st.integers(2, 2**70), st.text(max_size=4),
                                        st.floats(), st.booleans(), st.none(),
                                        st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("kind"), st.one_of(st.text(max_size=12).filter(lambda k: k != "slot"),
                                         NOT_A_NAME)),
    st.tuples(st.just("slot"), st.one_of(
        st.integers(-(2**70), 2**70), st.text(max_size=6), st.floats(), st.booleans(),
        st.none(), st.lists(st.integers(), max_size=2)).filter(
            lambda v: not (type(v) is int and v == 1) and v != "1")),
    st.tuples(st.just("container"), st.one_of(TEXT, NOT_A_NAME)),
    st.tuples(st.just("image"), st.one_of(BAD_IMAGE, NOT_A_NAME)),
    st.tuples(st.just("workspace"), st.sampled_from(["", A_FILE])),
    st.tuples(st.just("mounts"), st.one_of(st.text(max_size=5).filter(bool),
                                           st.lists(st.one_of(st.none(), st.integers(),
                                                              st.text(max_size=3)),
                                                    min_size=1, max_size=2),
                                           st.just([{"path": "/x"}]),
                                           st.just([{"source": "."}]))),
    st.tuples(st.just("environment"), st.one_of(st.lists(st.text(max_size=3), min_size=1,
                                                         max_size=2),
                                                st.text(max_size=4).filter(bool),
                                                st.integers(), st.just(True))),
)
"""A field of a slot record made wrong in a way every reader must refuse."""


@dataclass(frozen=True)
class Recipe:
    """How to make hostile stdin from the test's valid slot record."""

    how: str
    detail: Any = None
    extra: Any = None

    def render(self, record: dict[str, Any]) -> bytes:
        text = json.dumps(record)
        if self.how == "field":
            key, value = self.detail
            return json.dumps({**record, **self.extra, key: value}).encode()
        if self.how == "drop":
            return json.dumps({k: v for k, v in {**record, **self.extra}.items()
                               if k not in self.detail}).encode()
        if self.how == "nest":
            key, depth, opener = self.detail
            closer = {"[": "]", '{"a":': "}"}[opener]
            head = text[:-1] + f', "{key}": ' if key not in record else \
                json.dumps({k: v for k, v in record.items() if k != key})[:-1] + f', "{key}": '
            return (head + opener * depth + "1" + closer * depth + "}").encode()
        if self.how == "cut":
            return text[:self.detail % len(text)].encode()
        if self.how == "prefix":
            return self.detail + text.encode()
        if self.how == "huge":
            return (text[:-1] + f', "slot": {"9" * self.detail}}}').encode()
        if self.how == "top":
            return json.dumps(self.detail).encode()
        return self.detail  # "bytes"


RECIPES: Final = st.one_of(
    st.builds(Recipe, st.just("field"), FIELD_DAMAGE,
              st.dictionaries(st.text(max_size=8).filter(lambda k: k not in REQUIRED
                                                        and k not in ("coi", "kind")),
                              JSON_VALUES, max_size=2)),
    st.builds(Recipe, st.just("drop"),
              st.sets(st.sampled_from((*REQUIRED, "coi", "kind")), min_size=1), st.just({})),
    st.builds(Recipe, st.just("nest"), st.tuples(
        st.sampled_from([*REQUIRED, "environment", "mounts", "extra"]),
        st.integers(65, 20000), st.sampled_from(["[", '{"a":']))),
    st.builds(Recipe, st.just("cut"), st.integers(0, 10**6)),
    st.builds(Recipe, st.just("prefix"), st.sampled_from(
        [b"\xef\xbb\xbf", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"garbage\n", b"[\n",
         b"\x00", b"\x1b[2J"])),
    st.builds(Recipe, st.just("huge"), st.integers(4300, 20000)),
    st.builds(Recipe, st.just("top"), st.one_of(
        st.lists(JSON_VALUES, max_size=3), st.text(max_size=8), st.integers(), st.none(),
        st.booleans())),
    st.builds(Recipe, st.just("bytes"), st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"\n\n", b"   ", b"NaN", b"Infinity", b"-Infinity", b"1e999",
                         b"{", b"}", b'{"coi": 1, "kind": "slot"', b"\xff\xfe{\x00}\x00",
                         b"[" * 100000, b'{"a":' * 50000, b"1" * 5000, b"-" + b"1" * 5000,
                         b'"' + b"\\ud800" * 3 + b'"']))),
)


def slot_record(workspace: Path) -> dict[str, Any]:
    """A valid slot record of slot 1 of `workspace`: the base every recipe damages."""
    path = os.path.realpath(workspace)
    return {"coi": 1, "kind": "slot", "workspace": path, "slot": 1,
            "container": naming.container_name(path, 1), "persistent": False,
            "image": IMAGE, "profile": "coi", "tool": "dummy", "network": "restricted",
            "environment": {}, "mounts": [], "storage": ""}


READERS: Final = {
    "coi-net apply": ("coi-net", ["apply", "--dry-run"]),
    "coi-net network apply": ("coi-net", ["network", "apply", "--dry-run", "--format=json"]),
    "coi-session save": ("coi-session", ["save"]),
    "coi-session restore": ("coi-session", ["session", "restore", SESSION, "--format=json"]),
    "coi network apply": ("coi", ["network", "apply", "--dry-run"]),
    "coi session save": ("coi", ["session", "save", "--format=json"]),
}
"""The commands that read a slot record on stdin (coi-slot next | ...), in-process.
`coi shell` reads one too, but only with a terminal: see the pexpect test."""


# -- the properties ------------------------------------------------------------------------------


def _acts(tmp: Path) -> dict[str, Callable[[], object]]:
    """One of each kind of act the fence must stop (none of them harmful if it did not:
    the exec names a program that does not exist)."""
    import socket  # noqa: PLC0415

    return {
        "run a program": lambda: subprocess.run(["true"], check=False),
        "exec": lambda: os.execv(str(tmp / "no-such-program"), ["x"]),
        "make a directory": lambda: os.mkdir(tmp / "made"),
        "write a file": lambda: (tmp / "written").write_text("x"),
        "create with os.open": lambda: os.open(tmp / "created", os.O_WRONLY | os.O_CREAT),
        "append": lambda: open(tmp / A_FILE, "a").close(),
        "rename": lambda: os.replace(tmp / A_FILE, tmp / "renamed"),
        "remove": lambda: os.remove(tmp / A_FILE),
        "chmod": lambda: os.chmod(tmp / A_FILE, 0o777),
        "open a socket": lambda: socket.socket(socket.AF_UNIX).close(),
        "resolve a name": lambda: socket.getaddrinfo("localhost", 53),
    }


@pytest.mark.parametrize("act", sorted(_acts(Path())))
def test_the_fence_stops_every_kind_of_act_and_lets_reading_through(act, tmp_path):
    (tmp_path / A_FILE).write_text("kept\n")
    before = _tree(tmp_path)
    with fenced() as tried:
        assert (tmp_path / A_FILE).read_text() == "kept\n"
        with pytest.raises(Breach):
            _acts(tmp_path)[act]()
    assert len(tried) == 1
    assert _tree(tmp_path) == before


def test_an_unexpected_word_is_named_as_it_was_typed(hostile):
    """Empty, quoted and escape-laden words, and the word None, each named once."""
    outcome = hostile.run("coi-slot", ["list", "", "it's", "\x1b[2J", "None"])
    assert_refused(outcome)
    assert outcome.err.splitlines()[0] == (
        "coi-slot list: unexpected argument '', \"it's\", '\\x1b[2J', 'None'")


@pytest.mark.parametrize("program", sorted(PACKAGES))
def test_a_garbage_command_line_is_a_usage_error_and_does_nothing(program, hostile):
    @bounded(150)
    @given(argv=garbage_line(program))
    def check(argv):
        EXAMPLES["garbage argv"] += 1
        assert_refused(hostile.run(program, argv))
        hostile.assert_untouched()

    check()


@pytest.mark.parametrize("program", sorted(VALUE_LINES))
def test_one_bad_value_is_refused_before_anything_happens(program, hostile):
    lines = VALUE_LINES[program]

    @bounded(200)
    @given(argv=st.one_of(*(argv_of(parts) for parts in lines)))
    def check(argv):
        EXAMPLES["bad values"] += 1
        on_terminal = program in ("coi", "coi-shell") and argv[:1] == ["shell"]
        assert_refused(hostile.run(program, argv, on_terminal=on_terminal))
        hostile.assert_untouched()

    check()


@pytest.mark.parametrize("program", sorted(QUERY_LINES))
def test_a_malformed_name_never_exists(program, hostile):
    @bounded(40)
    @given(argv=st.one_of(*(argv_of(parts) for parts in QUERY_LINES[program])))
    def check(argv):
        EXAMPLES["queries"] += 1
        outcome = hostile.run(program, argv)
        assert_refused(outcome, status=1)
        assert (outcome.out, outcome.err) == ("", "")
        hostile.assert_untouched()

    check()


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_hostile_record_on_stdin_is_refused(reader, hostile):
    program, argv = READERS[reader]
    record = slot_record(hostile.workspace)

    @bounded(120)
    @given(recipe=RECIPES)
    def check(recipe):
        EXAMPLES["stdin"] += 1
        assert_refused(hostile.run(program, argv, data=recipe.render(record)))
        hostile.assert_untouched()

    check()


def _outside(hostile: Hostile, argv: Sequence[str], data: bytes | None) -> Outcome:
    """bin/coi ARGV in a subprocess of its own session (no terminal), stdin `data`."""
    with hostile.stdin(data) as stdin:
        done = subprocess.run([str(ROOT / "bin" / "coi"), *argv], stdin=stdin,
                              capture_output=True, timeout=60, check=False,
                              start_new_session=True)
    return Outcome(tuple(argv), done.returncode, done.stdout.decode("utf-8", "replace"),
                   done.stderr.decode("utf-8", "replace"), ())


def test_bin_coi_refuses_hostile_input_from_outside(hostile):
    record = slot_record(hostile.workspace)

    @bounded(25)
    @given(argv=st.one_of(garbage_line("coi"),
                          st.one_of(*(argv_of(parts) for parts in VALUE_LINES["coi"]))),
           recipe=st.none() | RECIPES)
    def check(argv, recipe):
        EXAMPLES["bin/coi"] += 1
        assert_refused(_outside(hostile, argv, recipe and recipe.render(record)))
        hostile.assert_untouched()

    check()


def test_bin_coi_refuses_hostile_records_on_stdin_from_outside(hostile):
    record = slot_record(hostile.workspace)

    @bounded(12)
    @given(argv=st.sampled_from([["network", "apply", "--dry-run"], ["session", "save"],
                                 ["session", "restore", SESSION, "--format", "json"]]),
           recipe=RECIPES)
    def check(argv, recipe):
        EXAMPLES["bin/coi stdin"] += 1
        assert_refused(_outside(hostile, argv, recipe.render(record)))
        hostile.assert_untouched()

    check()


def test_coi_shell_refuses_a_hostile_record_under_a_terminal(hostile):
    """`coi-slot next | coi shell` from a terminal: stdin carries the record, /dev/tty is
    the user's. pexpect gives the run a real terminal; stdin is the hostile file."""
    record = slot_record(hostile.workspace)

    @bounded(10)
    @given(recipe=RECIPES)
    def check(recipe):
        EXAMPLES["coi shell under a terminal"] += 1
        hostile.stdin_path.write_bytes(recipe.render(record))
        child = pexpect.spawn("/bin/sh", ["-c", 'exec "$0" shell < "$1"',
                                          str(ROOT / "bin" / "coi"), str(hostile.stdin_path)],
                              env=dict(os.environ), timeout=60, encoding="utf-8",
                              codec_errors="replace")
        said = child.read()
        child.close()
        outcome = Outcome(("shell",), child.exitstatus, "", said.replace("\r\n", "\n"), ())
        assert_refused(outcome)
        hostile.assert_untouched()

    check()


# -- Regressions: gaps these properties found, each closed by the patch it names -------------
#
# Each input below was accepted, or refused only after coi acted (asked Incus, reserved a
# slot, made a directory).

SHELL_PATCH = "coi-shell/coi_shell/session.py: a flag given empty, and checks after acting"
CONFIG_PATCH = "lib/coi_common/config.py: integer flags and quoting in messages"
SERVE_PATCH = "coi-host/coi_host/service.py: serve --socket PATH checked"
RECORD_PATCH = "lib/coi_common/sessions.py: SlotRecord.from_record checks every field"


def awaiting(patch: str, program: str, *argv: str, terminal: bool = False):
    """A case the patch `patch` closed (kept by name, so a regression says where)."""
    return pytest.param(program, list(argv), terminal, id=" ".join([program, *argv])[:60])


@pytest.mark.parametrize(("program", "argv", "terminal"), [
    *(awaiting(SHELL_PATCH, "coi-shell", "run", f"{flag}=", "--", "true")
      for flag in ("--slot", "--image", "--tool", "--network", "--processes", "--session")),
    awaiting(SHELL_PATCH, "coi-shell", "shell", "--session=", terminal=True),
    awaiting(SHELL_PATCH, "coi-shell", "run", "--storage=made-first", "--env=1=2", "--", "true"),
    awaiting(SHELL_PATCH, "coi-shell", "run", "--storage=/etc/coi-hostile", "--", "true"),
    awaiting(SHELL_PATCH, "coi-shell", "run", "--mount=/:/host", "--", "true"),
    awaiting(SHELL_PATCH, "coi-shell", "run", "--mount=.:/workspace", "--", "true"),
    awaiting(SHELL_PATCH, "coi-shell", "run", "--session=../x", "--", "true"),
    awaiting(SHELL_PATCH, "coi-shell", "attach", "bad name"),
    awaiting(SHELL_PATCH, "coi-shell", "attach", "--slot=-1"),
    awaiting(CONFIG_PATCH, "coi-shell", "run", "--processes=" + "9" * 5000, "--", "true"),
    awaiting(CONFIG_PATCH, "coi-shell", "run", "--network=\x9b2J\u202e", "--", "true"),
    awaiting(SERVE_PATCH, "coi-host", "serve", "--socket="),
    awaiting(SERVE_PATCH, "coi-host", "serve", f"--socket={A_FILE}"),
])
def test_awaiting_patch_command_line_is_refused_before_anything_happens(
        program, argv, terminal, hostile):
    assert_refused(hostile.run(program, argv, on_terminal=terminal))
    hostile.assert_untouched()


@pytest.mark.parametrize(("field", "value"), [
    pytest.param(field, value, id=field)  # closed by RECORD_PATCH
    for field, value in [
        ("workspace", ["x"]), ("persistent", "false"), ("profile", ["coi"]), ("tool", "../x"),
        ("network", "wide"), ("storage", 5), ("storage", "relative"),
        ("environment", {"A B": "1"}),
        ("environment", {"A": 1}), ("mounts", [{"source": ".", "path": "/x", "readonly": 1}]),
        ("mounts", [{"source": ".", "path": "relative"}]),
        ("limits", {"cpu": 2}), ("limits", {"memory": "lots"}), ("limits", {"swap": "1G"}),
        ("limits", {"processes": -1}), ("mask", "false"), ("allow_home", 1),
        ("resume", "../x"), ("config_profile", "../x"), ("profile", "a b")]
])
def test_awaiting_patch_record_field_is_refused(field, value, hostile):
    record = {**slot_record(hostile.workspace), field: value}
    outcome = hostile.run("coi-session", ["save"], data=json.dumps(record).encode())
    assert_refused(outcome)
    assert f"slot record: {field}" in outcome.err  # the refusal names the field
    hostile.assert_untouched()


@pytest.mark.incus
def test_no_instance_or_image_of_these_tests_exists(incus_client):
    """From the real daemon's side: nothing above created anything (run last)."""
    def ours(name: str) -> bool:
        return MARK in name or any(name.startswith(prefix) for prefix in PREFIXES)

    instances = [i["name"] for i in incus_client.instances() if ours(i["name"])]
    aliases = [alias["name"] for image in incus_client.images()
               for alias in image.get("aliases") or [] if ours(alias["name"])]
    assert (instances, aliases) == ([], [])
