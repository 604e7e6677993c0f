"""The root-owned copy of coi behind coi's host service, and the service's lifetime.

Root must not run code that a user can change, so `coi setup` copies the
Python packages the service needs (coi_common, coi_host, coi_net and the two
pure-Python libraries they import, docopt-ng and dnspython) from wherever
setup itself runs into SERVICE_ROOT/lib-DIGEST, owned by root, with launchers that run a
root-owned interpreter in isolated mode (-I: no PYTHON* variables, no user
site). The copy is named by the digest of its contents, so a second setup with
the same code changes nothing, and new code replaces the running service.
Where systemd runs, a unit keeps the service up (also across reboots); where
no init system does (as on these build machines), setup starts it itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Final

from coi_common import hostservice, proc
from coi_common.errors import CoiError

SERVICE_ROOT: Final = Path("/usr/local/lib/coi")
PACKAGES: Final = ("coi_common", "coi_host", "coi_net", "docopt", "dns")
EXECUTABLES: Final = {"coi-host": "coi_host", "coi-net": "coi_net"}
START_HOOK: Final = "coi-net-hook"
START_HOOK_SOURCE: Final = "start-host-hook.sh"
UNIT_PATH: Final = Path("/etc/systemd/system/coi-host.service")
PID_FILE: Final = Path("/run/coi/host.pid")
LOG_FILE: Final = Path("/var/log/coi/host-service.log")
START_SECONDS: Final = 10.0
UNIT: Final = """[Unit]
Description=coi host service (network rules and id maps for coi sessions)
After=incus.service

[Service]
ExecStart={launcher} serve
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def package_dirs() -> dict[str, Path]:
    """Where each package the service needs is imported from right now."""
    found = {}
    for name in PACKAGES:
        module = importlib.import_module(name)
        found[name] = Path(module.__file__ or "").resolve().parent
    return found


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def code_digest(dirs: dict[str, Path] | None = None) -> str:
    """A digest of every file of the service's packages (paths relative to each)."""
    digest = hashlib.sha256()
    for name, folder in sorted((dirs or package_dirs()).items()):
        for path in _files(folder):
            digest.update(f"{name}/{path.relative_to(folder)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def interpreter() -> str:
    """A Python 3.11+ that only root can change: ours when it is, else /usr/bin/python3."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        real = Path(os.path.realpath(candidate))
        if real.is_file() and _root_only(real) and _root_only(real.parent):
            done = proc.run([str(real), "-I", "-c",
                             "import sys; sys.exit(sys.version_info < (3, 11))"], check=False)
            if done.ok:
                return str(real)
    raise CoiError("no root-owned Python 3.11 or newer for coi's host service",
                   hint="install python3 (3.11+) from the distribution")


def _root_only(path: Path) -> bool:
    info = path.stat()
    return info.st_uid == 0 and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def install(root: Path = SERVICE_ROOT) -> tuple[bool, str]:
    """Make SERVICE_ROOT hold this code and its launchers; (changed, digest)."""
    dirs = package_dirs()
    digest = code_digest(dirs)
    python = interpreter()
    target = root / f"lib-{digest}"
    changed = not target.is_dir()
    if changed:
        staging = root / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for name, folder in dirs.items():
            shutil.copytree(folder, staging / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        proc.run([python, "-I", "-m", "compileall", "-q", str(staging)], check=False)
        os.replace(staging, target)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for program, module in EXECUTABLES.items():
        changed |= _write_if_changed(root / "bin" / program,
                                     launcher(python, root, target, program, module), 0o755)
    # Incus runs it at every start of a coi container (coi-net's start hook): at a path
    # that outlives each copy, beside the coi-net it calls.
    changed |= _write_if_changed(root / "bin" / START_HOOK,
                                 (dirs["coi_net"] / START_HOOK_SOURCE).read_text(), 0o755)
    for old in root.glob("lib-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return changed, digest


def launcher(python: str, root: Path, lib: Path, program: str, module: str) -> str:
    code = (f"import sys, runpy; sys.path.insert(0, {str(lib)!r}); "
            f"sys.argv[0] = {str(root / 'bin' / program)!r}; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    return (f"#!/bin/sh\n# {program} of coi's host service; written by coi setup (root-owned).\n"
            f"COI_BIN_DIR={root / 'bin'} exec {python} -I -c \"{code}\" \"$@\"\n")


def _write_if_changed(path: Path, text: str, mode: int) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)
    return True


# -- the running service -------------------------------------------------------------------


def running_code() -> str | None:
    """The code digest of the service answering on the default socket, or None."""
    try:
        return str(hostservice.call("ping", timeout=3).get("code", ""))
    except CoiError:
        return None


def ensure_running(digest: str, *, systemd: bool, root: Path = SERVICE_ROOT) -> str:
    """Make the service of this code answer; say what was done ("" when nothing)."""
    if running_code() == digest:
        return ""
    launcher_path = root / "bin" / "coi-host"
    if systemd:
        _write_if_changed(UNIT_PATH, UNIT.format(launcher=launcher_path), 0o644)
        proc.run(["systemctl", "daemon-reload"])
        proc.run(["systemctl", "enable", "--now", "coi-host.service"])
        proc.run(["systemctl", "restart", "coi-host.service"])
        how = "restarted coi-host.service"
    else:
        stop_started()
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        PID_FILE.parent.mkdir(parents=True, exist_ok=True)
        pid = proc.spawn_detached([str(launcher_path), "serve"], str(LOG_FILE))
        PID_FILE.write_text(f"{pid}\n", encoding="utf-8")
        how = f"started it (pid {pid}; no init system: setup starts it after a reboot)"
    deadline = time.monotonic() + START_SECONDS
    while running_code() != digest:
        if time.monotonic() > deadline:
            raise CoiError("coi's host service did not start",
                           hint=f"see {LOG_FILE}" if not systemd else
                           "see: journalctl -u coi-host.service")
        time.sleep(0.1)
    return how


def stop_started() -> bool:
    """Stop the service a previous setup started by hand (its pid file), if it runs;
    True when it did."""
    try:
        pid = int(PID_FILE.read_text(encoding="utf-8").strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    if b"serve" not in command or not any(b"coi_host" in part for part in command):
        return False  # a stale pid file: that number belongs to another process now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    return True
