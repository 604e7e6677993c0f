"""Real non-root accounts for tests: coi as its main user runs it, a member of incus-admin.

`test_user` (one per pytest session) is a fresh account `coi-test-u<6 hex>`
with a free uid of 20000-29999 (never 1000), its own group of the same id
and a home under /tmp. It joins `incus-admin` after `coi setup` has run, and
gets no /etc/subuid or /etc/subgid lines: it is "a member added after
setup", whose id map coi has to grant itself. `make_test_user` makes more
such accounts within one test. `installed_user` is `test_user` after it
installed a copy of this checkout with ./install.sh, as the README says.

Everything is removed at the end, also on failure: the account's processes,
the `root:ID:1` lines granted to it during the run, its home, the account.
tests/sweep.py removes what a killed run left.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import sweep
from coi_common import idmap
from coi_common.errors import CoiError

ROOT = Path(__file__).resolve().parent.parent
SETUP_HINT = "run `make test-image` as root (it runs `bin/coi setup`)"
INCUS_GROUP = "incus-admin"
UID_RANGE = range(20000, 30000)
LOGIN_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class TestUser:
    """A real account tests run commands as: `run(argv)` is like the user typing argv in
    a fresh login shell (clean environment, own groups, home as the current directory)."""

    __test__ = False  # a helper, not a test class

    name: str
    uid: int
    gid: int
    home: Path

    def login_env(self) -> dict[str, str]:
        """What a login gives the user: nothing of the test runner's COI_* or PIP_*."""
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": f"{self.home}/.local/bin:{LOGIN_PATH}",
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                "TERM": os.environ.get("TERM", "dumb")}

    def run(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            cwd: str | Path | None = None, input_text: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run argv as this user (never raises on a non-zero exit); `env` adds to the
        login environment."""
        stdin = {"input": input_text} if input_text is not None else {"stdin": subprocess.DEVNULL}
        return subprocess.run(
            ["setpriv", "--reuid", str(self.uid), "--regid", str(self.gid), "--init-groups",
             *argv],
            env={**self.login_env(), **(env or {})}, cwd=cwd or self.home, capture_output=True,
            text=True, timeout=timeout, check=False, **stdin)


@dataclass(frozen=True)
class InstalledUser(TestUser):
    """A test user who ran ./install.sh in `source`, a copy of this checkout; `coi` is
    the installed ~/.local/bin/coi."""

    source: Path
    coi: Path

    def install(self, *, env: Mapping[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`./install.sh` in the checkout copy, as the README tells a user to run it."""
        return self.run(["./install.sh"], cwd=self.source, env=env, timeout=timeout)


def _free_id() -> int:
    """A uid that is also a free gid, and that no subid line lets root map yet."""
    ranges = idmap.root_ranges(idmap.SUBUID) + idmap.root_ranges(idmap.SUBGID)
    taken = {entry.pw_uid for entry in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    free = [i for i in UID_RANGE if i not in taken and not idmap.covered(i, ranges)]
    if not free:
        pytest.fail(f"no free uid in {UID_RANGE.start}-{UID_RANGE.stop - 1} for a test user",
                    pytrace=False)
    return free[secrets.randbelow(len(free))]


def create_user(suffix: str, *, incus_admin: bool = True) -> TestUser:
    """Account `coi-test-u<suffix>` with home /tmp/coi-test-home-<suffix>, mode 0755 so
    tests can look in; a member of incus-admin unless told otherwise."""
    name = f"{sweep.USER_PREFIX}{suffix}"
    ident = _free_id()
    user = TestUser(name, ident, ident, Path(f"{sweep.HOME_PREFIX}{suffix}"))
    subprocess.run(["groupadd", "--gid", str(ident), name], check=True, capture_output=True)
    try:
        # SUB_*_COUNT=0: useradd would otherwise give the account subordinate ids of its own.
        subprocess.run(["useradd", "--uid", str(ident), "--gid", str(ident), "--no-user-group",
                        "--home-dir", str(user.home), "--no-create-home", "--shell", "/bin/sh",
                        "-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0", name],
                       check=True, capture_output=True)
        user.home.mkdir(mode=0o755)
        user.home.chmod(0o755)  # whatever the umask
        os.chown(user.home, ident, ident)
        if incus_admin:
            subprocess.run(["usermod", "--append", "--groups", INCUS_GROUP, name], check=True,
                           capture_output=True)
    except BaseException:
        remove_user(user)
        raise
    return user


def remove_user(user: TestUser) -> None:
    """The account, its processes, home and the subid lines granted to it."""
    try:
        pwd.getpwnam(user.name)
    except KeyError:  # creation failed before useradd: only the group is there
        subprocess.run(["groupdel", user.name], check=False, capture_output=True)
        return
    sweep.remove_test_user(user.name)


def _require_incus_group() -> None:
    try:
        grp.getgrnam(INCUS_GROUP)
    except KeyError:
        pytest.fail(f"group {INCUS_GROUP!r} is missing: coi setup has not run; {SETUP_HINT}",
                    pytrace=False)


@pytest.fixture(scope="session")
def test_user(incus_run_lock: None) -> Iterator[TestUser]:
    """The session's non-root incus-admin member (made after the session's sweep)."""
    _require_incus_group()
    user = create_user(secrets.token_hex(3))
    yield user
    remove_user(user)


@pytest.fixture
def make_test_user(incus_run_lock: None) -> Iterator[Callable[..., TestUser]]:
    """make_test_user(incus_admin=True) -> a fresh TestUser of this test alone, for
    tests that need one nobody else used (no id map granted, not in the group)."""
    _require_incus_group()
    made: list[TestUser] = []

    def factory(*, incus_admin: bool = True) -> TestUser:
        made.append(create_user(secrets.token_hex(3), incus_admin=incus_admin))
        return made[-1]

    yield factory
    problems = []
    for user in made:
        try:
            remove_user(user)
        except (CoiError, OSError, subprocess.CalledProcessError) as exc:
            problems.append(f"{user.name}: {exc}")
    if problems:
        pytest.fail("could not remove test users: " + "; ".join(problems), pytrace=False)


def copy_checkout(destination: Path) -> None:
    """This checkout's files as a commit of now would hold them (tracked and new files,
    as they are in the working tree; nothing ignored), readable by everyone."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True)
    for name in sorted(set(listing.stdout.decode().split("\0")) - {""}):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree, or a submodule
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.copy2(source, target)
        target.chmod(target.stat().st_mode | 0o444)


def install_for(user: TestUser, source: Path) -> InstalledUser:
    """Run ./install.sh of `source` as `user`; the test fails with its output if it fails."""
    installed = InstalledUser(user.name, user.uid, user.gid, user.home, source=source,
                              coi=user.home / ".local" / "bin" / "coi")
    done = installed.install()
    if done.returncode != 0:
        pytest.fail(f"./install.sh as {user.name} exited {done.returncode}:\n"
                    f"{done.stdout}{done.stderr}", pytrace=False)
    return installed


@pytest.fixture(scope="session")
def checkout_copy() -> Iterator[Path]:
    """A root-owned copy of this checkout that every user can read (not write: the
    install must not need to write into the checkout it installs)."""
    path = Path(tempfile.mkdtemp(prefix="coi-test-src-", dir="/tmp"))
    path.chmod(0o755)
    copy_checkout(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def installed_user(test_user: TestUser, checkout_copy: Path) -> InstalledUser:
    """`test_user` after running ./install.sh of a copy of this checkout."""
    return install_for(test_user, checkout_copy)
