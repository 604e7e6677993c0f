"""Fixtures shared by coi's test suites.

Every test gets its own coi directories and container prefix (`coi_env`).
Tests marked `incus` talk to the real daemon and run containers of the test
image `coi-test-image` (built by `make test-image`, tests/image/build.py);
when the daemon or the image is missing they FAIL with the command that
fixes it, never skip. Everything they create is named `coi-test-...`, and
every fixture removes what it made, also when the test fails.

From its first `incus` test on, a session holds tests/sweep.py's run lock
(shared). A session that is the only one on the machine first sweeps the
leftovers of crashed runs; one that starts while another runs leaves them
alone, since they may be the other run's live containers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from coi_common import proc
from coi_common.errors import CoiError, NotFound
from coi_common.incus import ExecSpec, Incus, ipv4_of

pytest_plugins = ["fixtures_users", "zone_server"]  # test users; dns_server

ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE = "coi-test-image"
PROFILE = "coi"
NETWORK = "coibr0"
CONTAINER_PREFIX = "coi-test-"
IP_TIMEOUT = 30.0
SETUP_HINT = ("run `make test-image` (as root: it runs `bin/coi setup` and builds the "
              "test image), or `sudo bin/coi setup` then "
              "`sudo .venv/bin/python tests/image/build.py`")
NOBODY = 65534
AS_NOBODY = ("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups")


def load_module(name: str, path: Path) -> ModuleType:
    """Import a script of tests/ (sweep.py, image/build.py) by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_script = load_module("coi_test_sweep", ROOT / "tests" / "sweep.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--keep-on-failure", action="store_true",
                     help="keep the containers of a failed test for debugging (the next "
                          "run's sweep removes them)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    """Remember each phase's report on the item, so fixtures can see if the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
               for when in ("setup", "call"))


# -- session: lock and sweep ----------------------------------------------------------


@pytest.fixture(autouse=True)
def _incus_tests_hold_the_run_lock(request: pytest.FixtureRequest) -> None:
    """Before the first `incus` test of the session: the sweep and the run lock.

    Only marked tests ask for it, so a unit test never waits for, or fails on,
    the daemon.
    """
    if request.node.get_closest_marker("incus"):
        request.getfixturevalue("incus_run_lock")


@pytest.fixture(scope="session")
def incus_run_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Sweep leftovers once (when no other run is active), then hold the run lock shared."""
    lock = sweep_script.RunLock()
    try:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if lock.try_exclusive():
            removed, problem = [], ""
            try:
                removed = sweep_script.sweep()
            except CoiError as exc:
                problem = exc.one_line()
            if problem:  # failed outside the except block: no chained traceback
                pytest.fail(f"cannot sweep the leftovers of earlier test runs: {problem}. "
                            f"The real-Incus tests run as root on a set-up machine; "
                            f"{SETUP_HINT}", pytrace=False)
            for line in removed:
                if reporter is not None:
                    reporter.write_line(f"sweep: {line}")
        elif reporter is not None:
            reporter.write_line("sweep: another test run is active; leftovers left alone")
        lock.share()
        yield
        # The run's containers are gone; the empty view directories and lock files coi
        # keeps for containers are the run's to remove (when no other run needs them).
        if lock.try_exclusive():
            sweep_script.sweep_container_files()
    finally:
        lock.release()


# -- isolated coi environment --------------------------------------------------------------


@dataclass(frozen=True)
class CoiEnv:
    """The isolated directories and container prefix of one test."""

    root: Path
    home: Path
    config_home: Path
    system_config: Path
    prefix: str

    def environ(self, **extra: str) -> dict[str, str]:
        """os.environ as the test set it up (for subprocesses), plus `extra`."""
        return {**os.environ, **extra}


@pytest.fixture
def coi_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CoiEnv]:
    """HOME, XDG_CONFIG_HOME, COI_SYSTEM_CONFIG and COI_CONTAINER_PREFIX of this test only,
    and its own nftables table and network state (COI_NFT_TABLE, COI_NET_STATE_DIR),
    removed at the end, so sessions a test starts never touch coi's real rules.

    COI_* variables of the caller's shell are removed, so a developer's
    settings cannot change what a test sees. The system config path does not
    exist unless the test writes it.
    """
    for name in list(os.environ):
        if name.startswith("COI_"):
            monkeypatch.delenv(name)
    root = tmp_path / "coi-env"
    env = CoiEnv(root=root, home=root / "home", config_home=root / "home" / ".config",
                 system_config=root / "etc" / "coi" / "config.toml",
                 prefix=f"{CONTAINER_PREFIX}{secrets.token_hex(3)}-")
    env.config_home.mkdir(parents=True)
    env.system_config.parent.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(env.home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(env.config_home))
    monkeypatch.setenv("COI_SYSTEM_CONFIG", str(env.system_config))
    monkeypatch.setenv("COI_CONTAINER_PREFIX", env.prefix)
    table = "coi_test_" + env.prefix.removeprefix(CONTAINER_PREFIX).rstrip("-")
    monkeypatch.setenv("COI_NFT_TABLE", table)
    monkeypatch.setenv("COI_NET_STATE_DIR", str(root / "net-state"))
    # coi's own children (coi-slot end runs coi-session save, ...) come from this checkout.
    monkeypatch.setenv("COI_BIN_DIR", str(ROOT / "bin"))
    yield env
    for family in ("bridge", "inet"):
        proc.run(["nft", "delete", "table", family, table], check=False)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A short, world-readable temp dir: unix socket paths must stay under 108 bytes,
    and processes running as uid 65534 must be able to read it (tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="coi-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stale_socket(open_tmp: Path) -> Path:
    """A unix socket file that nobody listens on any more."""
    path = open_tmp / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.close()
    assert path.is_socket()
    return path


@dataclass(frozen=True)
class Nobody:
    """How to run this checkout's code as uid 65534 without groups: put `argv` before
    the command, use `python` for snippets, pass `env`."""

    python: str
    env: dict[str, str]
    argv: tuple[str, ...] = AS_NOBODY


SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


@pytest.fixture
def nobody(open_tmp: Path) -> Nobody:
    """uid 65534 with its own empty home and coi directories, and an interpreter it can run.

    The checkout's venv interpreter may be a link into a home that uid 65534
    cannot enter (pyenv under /root here). Then the system python3 runs the
    same code with the venv's site-packages on PYTHONPATH, and bin/coi picks
    it too, as it falls back to python3 on PATH when the venv one is not
    executable.
    """
    home = open_tmp / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    site = sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("COI_", "INCUS_", "PYTHON"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), PATH=SYSTEM_PATH,
               COI_SYSTEM_CONFIG=str(open_tmp / "etc" / "coi" / "config.toml"),
               PYTHONPATH=":".join(str(p) for p in (ROOT / "lib", ROOT / "coi-host", *site)))
    problems = []
    for python in (str(ROOT / ".venv" / "bin" / "python"),
                   shutil.which("python3", path=SYSTEM_PATH) or "python3"):
        probe = proc.run([*AS_NOBODY, python, "-c", "import docopt, coi_common, coi_host"],
                         env=env, check=False)
        if probe.ok:
            return Nobody(python, env)
        problems.append(f"{python}: {proc.last_line(probe.stderr)}")
    pytest.fail(f"uid {NOBODY} cannot run coi's code (make the checkout and its venv "
                f"readable by all): {'; '.join(problems)}", pytrace=False)


# -- Incus -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def incus_client(incus_run_lock: None) -> Incus:
    """A client of the real daemon; the test fails (not skips) when it does not answer.

    It holds the run lock first: a module fixture that builds with it runs before the
    autouse lock fixture, and another run's sweep must not take its containers.
    """
    client = Incus()
    problem = ""
    try:
        client.server_version()
    except CoiError as exc:
        problem = exc.one_line()
    if problem:
        pytest.fail(f"Incus is not usable: {problem}; {SETUP_HINT}", pytrace=False)
    return client


@pytest.fixture(scope="session")
def test_image(incus_client: Incus) -> str:
    """The alias of the test image; the test fails when it has not been built."""
    if incus_client.image_by_alias(TEST_IMAGE) is None:
        pytest.fail(f"the test image {TEST_IMAGE!r} is missing; {SETUP_HINT}", pytrace=False)
    return TEST_IMAGE


def _new_container_name() -> str:
    return f"{CONTAINER_PREFIX}{secrets.token_hex(4)}"


def _force_delete(client: Incus, name: str) -> None:
    """Stop (forced) and delete a container; nothing when it is gone already."""
    with contextlib.suppress(NotFound):  # gone between the look and the delete
        client.delete_instance_force(name)


def _wait_for_ipv4(client: Incus, name: str, timeout: float = IP_TIMEOUT) -> str:
    """The global IPv4 address of eth0, polled from the instance state until `timeout`."""
    deadline = time.monotonic() + timeout
    state: Mapping = {}
    while time.monotonic() < deadline:
        state = client.instance_state(name)
        address = ipv4_of(state)
        if address:
            return address
        time.sleep(0.1)
    eth0 = (state.get("network") or {}).get("eth0")
    pytest.fail(f"container {name} has no IPv4 address on eth0 after {timeout:g} s "
                f"(status {state.get('status')}, eth0 {eth0})", pytrace=False)


@dataclass(frozen=True)
class Container:
    """A container a test made: its name and, when started, its eth0 IPv4 address."""

    name: str
    ipv4: str | None = None


MakeContainer = Callable[..., Container]


@pytest.fixture
def make_container(request: pytest.FixtureRequest, incus_client: Incus,
                   test_image: str) -> Iterator[MakeContainer]:
    """A factory of `coi-test-<random>` containers from the test image, profile `coi`.

    make_container(start=True, config=None, devices=None, ephemeral=False)
    creates one, starts it unless start=False and then waits (30 s at most)
    until eth0 has an IPv4 address. Every container it made is force-deleted
    when the test ends, whatever happened; with --keep-on-failure those of a
    failed test stay for inspection.
    """
    made: list[str] = []

    def factory(*, start: bool = True, config: Mapping[str, str] | None = None,
                devices: Mapping[str, Mapping[str, str]] | None = None,
                ephemeral: bool = False) -> Container:
        name = _new_container_name()
        made.append(name)
        incus_client.create_instance(name, test_image, profiles=[PROFILE], config=config,
                                     devices=devices, ephemeral=ephemeral, start=start)
        return Container(name, _wait_for_ipv4(incus_client, name) if start else None)

    yield factory
    if made and request.config.getoption("--keep-on-failure") and _failed(request):
        print(f"\nkept for debugging: {', '.join(made)} (remove: make sweep)")
        return
    failures = []
    for name in made:
        try:
            _force_delete(incus_client, name)
        except CoiError as exc:
            failures.append(exc.one_line())
    if failures:
        pytest.fail("could not delete test containers: " + "; ".join(failures), pytrace=False)


@pytest.fixture
def container_name(incus_client: Incus) -> Iterator[str]:
    """A fresh `coi-test-<random>` name for a test that creates the container itself;
    whatever carries that name at the end is force-deleted."""
    name = _new_container_name()
    yield name
    _force_delete(incus_client, name)


RunIn = Callable[..., proc.Result]


@pytest.fixture(scope="session")
def run_in(incus_client: Incus) -> RunIn:
    """run_in(NAME, argv, user=None, env=None, timeout=60) -> proc.Result (never raises
    on a non-zero exit): `incus exec` in a container, optionally as a uid with env."""

    def execute(name: str, argv: Sequence[str], *, user: int | None = None,
                env: Mapping[str, str] | None = None, timeout: float = 60) -> proc.Result:
        # Through coi's one exec layer, so Incus's transient failures are retried here too.
        spec = ExecSpec(name, tuple(argv), user=user, env=dict(env or {}))
        return incus_client.exec_capture(spec, timeout=timeout)

    return execute


@pytest.fixture(scope="session")
def bridge_subnet(incus_client: Incus) -> ipaddress.IPv4Network:
    """The IPv4 subnet of coi's bridge."""
    network = incus_client.get_optional(f"/1.0/networks/{NETWORK}")
    if not network:
        pytest.fail(f"network {NETWORK!r} is missing; {SETUP_HINT}", pytrace=False)
    return ipaddress.IPv4Interface(network["config"]["ipv4.address"]).network


@pytest.fixture(scope="session")
def wait_for_ipv4(incus_client: Incus) -> Callable[..., str]:
    """wait_for_ipv4(NAME, timeout=30) -> the IPv4 address of eth0; fails the test after
    the timeout."""
    return lambda name, timeout=IP_TIMEOUT: _wait_for_ipv4(incus_client, name, timeout)


@pytest.fixture(scope="session")
def sweeper() -> ModuleType:
    """tests/sweep.py as a module: sweep(client, scope=...), RunLock."""
    return sweep_script


@pytest.fixture(scope="session")
def image_build() -> ModuleType:
    """tests/image/build.py as a module: recipe_hash(), debian_mirror(), image_hash()."""
    return load_module("coi_test_image_build", ROOT / "tests" / "image" / "build.py")


# -- real terminals ------------------------------------------------------------------------


class HostTerminal:
    """A tmux session on the host whose only window runs a command, for driving
    interactive coi sessions: type keys, read the screen."""

    def __init__(self, command, env, cwd):
        self.name = f"coi-test-term-{secrets.token_hex(3)}"
        script = " ".join(command) + "; echo COI-EXITED-$?; sleep 600"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "45",
                        "-c", str(cwd), script], env=env, check=True)

    def screen(self):
        return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-200", "-t",
                               self.name], capture_output=True, text=True, check=False).stdout

    def wait_for(self, text, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.screen():
                return
            time.sleep(0.2)
        pytest.fail(f"{text!r} never appeared; screen:\n{self.screen()}")

    def type(self, text):
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    def keys(self, *keys):
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def close(self):
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True,
                       check=False)


@pytest.fixture
def terminal() -> Iterator[Callable[..., HostTerminal]]:
    """terminal(argv, env, cwd) -> HostTerminal: a real terminal (a host tmux session)
    running argv; every one opened is closed at the end."""
    opened = []

    def open_terminal(command, env, cwd):
        term = HostTerminal(command, env, cwd)
        opened.append(term)
        return term

    yield open_terminal
    for term in opened:
        term.close()


# -- coi's host service, and sessions of the non-root test user ------------------------------


@dataclass(frozen=True)
class HostService:
    """A `coi-host serve` of this checkout, run as root for the test session, on its own
    socket, with its own nftables table and network state."""

    socket: str
    table: str
    state_dir: Path


@pytest.fixture(scope="session")
def host_service(incus_run_lock) -> Iterator[HostService]:
    """The checkout's host service on a test socket (COI_HOST_SOCKET for clients), so
    sessions of the test users exercise this code, not the copy `coi setup` installed;
    stopped, and its tables deleted, at the end."""
    folder = Path(tempfile.mkdtemp(prefix="coi-test-svc-", dir="/tmp"))
    folder.chmod(0o755)
    table = f"coi_test_svc{secrets.token_hex(3)}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("COI_")},
           "COI_NFT_TABLE": table, "COI_NET_STATE_DIR": str(folder / "net-state")}
    socket_path = str(folder / "host.sock")
    log = open(folder / "service.log", "ab")  # noqa: SIM115 - closed in the finalizer
    child = subprocess.Popen([str(ROOT / "bin" / "coi-host"), "serve", "--socket", socket_path],
                             env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not Path(socket_path).exists():
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the host service did not start: "
                            f"{(folder / 'service.log').read_text()}", pytrace=False)
            time.sleep(0.05)
        yield HostService(socket_path, table, folder / "net-state")
    finally:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        child.kill()
        log.close()
        for family in ("bridge", "inet"):
            proc.run(["nft", "delete", "table", family, table], check=False)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class UserCoi:
    """coi as the installed non-root test user, in a workspace of theirs, with a
    container prefix of this test and the test image and dummy tool."""

    user: object
    workspace: Path
    prefix: str
    env: dict[str, str]

    def __call__(self, *args: str, input_text: str | None = None, timeout: float = 180,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None):
        return self.user.run([str(self.user.coi), *args], env={**self.env, **(env or {})},
                             cwd=cwd or self.workspace, input_text=input_text,
                             timeout=timeout)

    def argv(self, *args: str) -> list[str]:
        """The command line that runs `coi ARGS` as the user (for a host terminal)."""
        exports = [f"{k}={v}" for k, v in {**self.user.login_env(), **self.env}.items()]
        return [shlex.join(["setpriv", "--reuid", str(self.user.uid), "--regid",
                            str(self.user.gid), "--init-groups", "env", "-i", *exports,
                            str(self.user.coi), *args])]


@pytest.fixture
def user_coi(installed_user, host_service, incus_client, test_image) -> Iterator[UserCoi]:
    """Run coi as the non-root test user; every container of this test's prefix is
    removed at the end, also on failure."""
    workspace = Path(tempfile.mkdtemp(prefix="coi-test-ws-", dir="/tmp"))
    os.chown(workspace, installed_user.uid, installed_user.gid)
    prefix = f"{CONTAINER_PREFIX}{secrets.token_hex(3)}-"
    env = {"COI_DEFAULTS_IMAGE": test_image, "COI_TOOL_NAME": "dummy",
           "COI_CONTAINER_PREFIX": prefix, "COI_HOST_SOCKET": host_service.socket}
    yield UserCoi(installed_user, workspace, prefix, env)
    for instance in incus_client.instances(prefix):
        _force_delete(incus_client, instance["name"])
    shutil.rmtree(workspace, ignore_errors=True)
