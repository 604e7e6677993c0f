"""Names coi gives to things, and the validators every outside name passes first.

A container is named `<prefix><hash8>-<slot>`: the prefix keeps coi's
containers apart from everything else on the host (and tests apart from a
user's sessions), the hash ties a container to one workspace directory
however it was reached, and the slot lets several sessions share it.

Every name that arrives from a user, a config file or stdin goes through a
validator here before it reaches a path, an `incus` argument or a file name.
The validators return the value unchanged, or raise BadInput with one line
saying what is wrong.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coi_common.errors import BadInput, NotFound

PREFIX_VARIABLE: Final = "COI_CONTAINER_PREFIX"
DEFAULT_PREFIX: Final = "coi-"
PREFIX_MAX_LEN: Final = 20
HASH_LEN: Final = 8
DEFAULT_MAX_SLOTS: Final = 10
SLOT_CEILING: Final = 999
"""No configuration may allow more slots; it keeps container names short."""

AUTO_SLOT: Final = 0
"""The slot value that asks coi to pick the lowest free slot."""

_LOWER: Final = "abcdefghijklmnopqrstuvwxyz"
_LETTERS: Final = _LOWER + _LOWER.upper()
_DIGITS: Final = "0123456789"
_SHOW_MAX: Final = 40


@dataclass(frozen=True)
class _Rule:
    """The character-level shape of one kind of name."""

    what: str
    max_len: int
    allowed: str
    first: str
    summary: str


_CONTAINER_RULE: Final = _Rule(
    "container name", 63, _LETTERS + _DIGITS + "-", _LETTERS,
    "1-63 ASCII letters, digits and dashes, starting with a letter, not ending with a dash")
_IMAGE_RULE: Final = _Rule(
    "image name", 128, _LETTERS + _DIGITS + "._-", _LETTERS + _DIGITS,
    "1-128 ASCII letters, digits, '.', '_' and '-', starting with a letter or digit")
_SESSION_RULE: Final = _Rule(
    "session id", 64, _LETTERS + _DIGITS + "_-", _LETTERS + _DIGITS,
    "1-64 ASCII letters, digits, '_' and '-', starting with a letter or digit")
_TOOL_RULE: Final = _Rule(
    "tool name", 32, _LOWER + _DIGITS + "_-", _LOWER,
    "1-32 lowercase ASCII letters, digits, '_' and '-', starting with a letter")
_DEVICE_RULE: Final = _Rule(
    "device name", 64, _LETTERS + _DIGITS + "._-", _LETTERS + _DIGITS,
    "1-64 ASCII letters, digits, '.', '_' and '-', starting with a letter or digit")
_PROFILE_RULE: Final = _Rule(
    "profile name", 64, _LETTERS + _DIGITS + "._-", _LETTERS + _DIGITS,
    "1-64 ASCII letters, digits, '.', '_' and '-', starting with a letter or digit")
_PREFIX_RULE: Final = _Rule(
    PREFIX_VARIABLE, PREFIX_MAX_LEN, _LOWER + _DIGITS + "-", _LOWER,
    "2-20 lowercase ASCII letters, digits and dashes, starting with a letter, ending with '-'")


def _show(value: object) -> str:
    """A value as it may appear in a one-line message: quoted, escaped, shortened."""
    if isinstance(value, str) and len(value) > _SHOW_MAX:
        return repr(value[:_SHOW_MAX]) + "..."
    # repr() of a huge int is slow and, past 4300 digits, raises ValueError.
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large number"
    return repr(value)


def _check(rule: _Rule, value: object) -> str:
    """Apply `rule` to `value`; the first problem found becomes the message."""
    if not isinstance(value, str):
        raise BadInput(f"{rule.what} must be a string, got {type(value).__name__}",
                       hint=rule.summary)
    problem = _problem(rule, value)
    if problem:
        raise BadInput(f"{rule.what} {_show(value)} {problem}", hint=rule.summary)
    return value


def _problem(rule: _Rule, value: str) -> str | None:
    if not value:
        return "is empty"
    if len(value) > rule.max_len:
        return f"is too long ({len(value)} characters, at most {rule.max_len})"
    bad = next((c for c in value if c not in rule.allowed), None)
    if bad is not None:
        return f"contains the character {bad!r}, which is not allowed"
    if value[0] not in rule.first:
        return f"may not start with {value[0]!r}"
    return None


def _fail(rule: _Rule, value: str, problem: str) -> BadInput:
    return BadInput(f"{rule.what} {_show(value)} {problem}", hint=rule.summary)


def validate_container_name(name: object) -> str:
    """An Incus instance name: a host name label (1-63 chars, letter first, no trailing dash)."""
    value = _check(_CONTAINER_RULE, name)
    if value.endswith("-"):
        raise _fail(_CONTAINER_RULE, value, "may not end with '-'")
    return value


def validate_image_name(name: object) -> str:
    """An image alias coi may create or use; never a path, never an option."""
    value = _check(_IMAGE_RULE, name)
    if ".." in value:
        raise _fail(_IMAGE_RULE, value, "may not contain '..'")
    return value


def validate_session_id(session_id: object) -> str:
    """A session id as it may name a directory under the sessions store.

    Wider than what coi-session makes (SESSION_ID_PATTERN) so ids saved by older
    versions stay usable.
    """
    return _check(_SESSION_RULE, session_id)


def validate_tool_name(name: object) -> str:
    """The name of an AI coding tool, as used for its TOML file and config table."""
    return _check(_TOOL_RULE, name)


def validate_device_name(name: object) -> str:
    """The name of an Incus device (a disk mount, say) as coi lets users give it."""
    return _check(_DEVICE_RULE, name)


def validate_profile_name(name: object) -> str:
    """An Incus profile, or a [profiles.NAME] table of coi's config."""
    return _check(_PROFILE_RULE, name)


ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A variable name coi passes into a container (ASCII: a shell must be able to use it)."""


def env_pair(item: str) -> tuple[str, str]:
    """`--env KEY=VALUE` split at the first '='; KEY a variable name, VALUE anything."""
    key, sep, value = item.partition("=")
    if not sep or not ENV_NAME.fullmatch(key):
        raise BadInput(f"--env {_show(item)} is not KEY=VALUE with KEY a variable name "
                       "(letters, digits, '_', not starting with a digit)")
    return key, value


NETWORK_MODES: Final = ("restricted", "allowlist", "open")
"""coi's egress modes (docs/network.md); restricted is the default."""
CPU_PATTERN: Final = re.compile(r"[1-9][0-9]{0,3}")
MEMORY_PATTERN: Final = re.compile(r"[1-9][0-9]{0,6}(MiB|GiB|MB|GB)|([1-9][0-9]?|100)%")


def validate_limits(cpu: str, memory: str, processes: int) -> dict[str, Any]:
    """A session's resource limits (--cpu, --memory, --processes), each checked;
    "" and 0 mean none."""
    if cpu and not CPU_PATTERN.fullmatch(cpu):
        raise BadInput(f"--cpu {cpu!r}: expected a number of CPUs such as 2")
    if memory and not MEMORY_PATTERN.fullmatch(memory):
        raise BadInput(f"--memory {memory!r}: expected a size such as 512MiB or 4GiB, "
                       "or a percentage such as 50%")
    if processes < 0 or processes > 10**7:
        raise BadInput(f"--processes {processes}: expected 0 (no limit) or more")
    return {"cpu": cpu, "memory": memory, "processes": processes}


def validate_prefix(prefix: object) -> str:
    """A container name prefix: lowercase, letter first, dash last, at most 20 chars."""
    value = _check(_PREFIX_RULE, prefix)
    if not value.endswith("-"):
        raise _fail(_PREFIX_RULE, value, "must end with '-'")
    return value


def validate_slot(value: object, max_slots: int = DEFAULT_MAX_SLOTS, *,
                  allow_auto: bool = False) -> int:
    """A slot number 1..max_slots from an int or a plain decimal string.

    With allow_auto, 0 is accepted too and means "pick a free slot". Booleans,
    floats, signs, spaces and leading zeros are refused so that exactly one
    spelling maps to each slot.
    """
    if not isinstance(max_slots, int) or isinstance(max_slots, bool) or \
            not 1 <= max_slots <= SLOT_CEILING:
        raise BadInput(f"max_slots {_show(max_slots)} must be an integer 1..{SLOT_CEILING}")
    slot = _slot_number(value)
    low = AUTO_SLOT if allow_auto else 1
    if not low <= slot <= max_slots:
        auto = " (0 picks a free slot)" if allow_auto else ""
        raise BadInput(f"slot {_show(slot)} is out of range {low}..{max_slots}{auto}")
    return slot


def _slot_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadInput(f"slot must be a whole number, got {type(value).__name__}")
    if isinstance(value, int):
        return value
    # A regex rather than int(): int() also takes ' 2', '+2', '1_0' and non-ASCII digits.
    if not re.fullmatch(r"0|[1-9][0-9]{0,5}", value):
        raise BadInput(f"slot {_show(value)} is not a plain decimal number")
    return int(value)


def canonical_workspace(path: str | os.PathLike[str]) -> str:
    """The absolute, symlink-free path of an existing directory.

    Two spellings of one directory (relative, through a symlink, with `..`)
    give the same string, so they map to the same containers and sessions.
    """
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise BadInput(f"workspace path {text!r} is not a usable path")
    real = os.path.realpath(text)
    # repr() keeps a path with a newline in it on one line; paths are never shortened.
    if not os.path.exists(real):
        raise NotFound(f"workspace {text!r} does not exist")
    if not os.path.isdir(real):
        raise BadInput(f"workspace {text!r} is not a directory")
    return real


GUARDED_HOST_PATHS: Final = ("/etc", "/root", "/boot", "/proc", "/sys", "/dev",
                              "/var/lib/incus", "/run/incus", "/var/lib/docker",
                              "/run/docker.sock", "/var/run/docker.sock", "/run/containerd",
                              "/run/podman", "/var/lib/lxd", "/var/snap/lxd", "/run/user")
"""Host paths no session may mount without --force, nor anything inside or holding
one of them: system configuration, kernel interfaces, and the container engines' state and
sockets (each is root on the host); /run/user holds every user's agent and keyring
sockets."""
INCUS_HOST_PATHS: Final = ("/var/lib/incus", "/run/incus")
"""Incus's own state and sockets: a session reaching them commands every container and
the host itself, so not even --force mounts them (or a directory holding them)."""
HOME_SECRETS: Final = (
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".password-store",
    ".config/gh", ".config/incus", ".config/lxc", ".config/gcloud", ".config/op",
    ".local/share/keyrings", ".local/share/kwalletd",
    # Browser profiles hold saved passwords and the session cookies of every site.
    ".mozilla", ".config/google-chrome", ".config/chromium",
    # Single files: token and password stores of git, curl, package registries, databases.
    ".netrc", ".git-credentials", ".config/git/credentials", ".npmrc", ".pypirc",
    ".cargo/credentials", ".cargo/credentials.toml", ".gem/credentials", ".pgpass",
    ".vault-token", ".config/containers/auth.json", ".terraform.d/credentials.tfrc.json",
)
"""Credential stores in the user's home (directories or files): never mounted, nor
anything inside; never read to be copied into a container or an image."""
COI_HOME_PATHS: Final = (".coi", ".config/coi")
"""coi's own state (trust pins, saved sessions) and user config: a session that could
write them could widen its own settings, so they are mounted only with --force."""
SECRET_SYSTEM_PATHS: Final = ("/root", "/proc", "/sys", "/dev", "/etc/shadow",
                               "/etc/gshadow", "/etc/ssh", "/etc/ssl/private",
                               "/var/lib/incus")
"""Host paths coi never reads to copy into a container or an image: root's home, the
kernel's interfaces (/proc/self/environ is coi's own environment), password hashes,
host and TLS private keys, Incus's keys."""


def check_host_mount(path: str, what: str, home: str, *, allow_home: bool = False,
                     force: bool = False) -> str:
    """`path` resolved (symlinks first), when a session may mount it (the workspace,
    --storage, --mount); else BadInput naming the path, why, and the flag that would
    allow it.

    Refused: the whole filesystem; Incus's state and sockets (INCUS_HOST_PATHS) or a
    directory holding them; a credentials store of `home` (HOME_SECRETS) or coi's own
    config and state (COI_HOME_PATHS) or anything inside; a guarded system path
    (GUARDED_HOST_PATHS, /root only when it is not `home`) or anything inside or
    holding one; anything holding `home`; `home` itself and directories holding a
    credentials store. `allow_home` permits the last two: the session then sees every
    file of the home, the credential stores in it included. `force` lifts every
    refusal but the first two: the whole filesystem and Incus's own state hand the
    session the host, and no flag makes them a project directory.
    """
    real = os.path.realpath(path)
    reason, flag = _mount_refusal(real, os.path.realpath(home), allow_home=allow_home,
                                  force=force)
    if reason:
        hint = f"pass {flag} if you mean it" if flag else "no flag allows this mount"
        raise BadInput(f"{what} {path!r} may not be mounted into a session: {reason}",
                       hint=hint)
    return real


def _mount_refusal(real: str, home: str, *, allow_home: bool,
                   force: bool) -> tuple[str, str | None]:
    """Why `real` may not be mounted ("" when it may) and the flag that would allow it."""
    lifted = {"--force": force, "--allow-home": force or allow_home}
    tiers = ((_never_mounted, None), (_mounted_with_force, "--force"),
             (_mounted_with_allow_home, "--allow-home"))
    for check, flag in tiers:
        reason = "" if flag and lifted[flag] else check(real, home)
        if reason:
            return reason, flag
    return "", None


def _never_mounted(real: str, _home: str) -> str:
    if real == "/":
        return "it is the whole host filesystem"
    incus = _near(real, _resolved(INCUS_HOST_PATHS))
    return f"it is, holds or lies in {incus}, Incus's own state" if incus else ""


def _mounted_with_force(real: str, home: str) -> str:
    places = _home_places(home)
    store = next((p for p, _ in places if _within(real, p)), None)
    if store:
        return f"it is or lies in {dict(places)[store]} {store}"
    if _inside(home, real):
        return f"it holds your home directory {home}"
    system = _near(real, [g for g in _resolved(GUARDED_HOST_PATHS) if g != home])
    return f"it is, holds or lies in {system}" if system else ""


def _mounted_with_allow_home(real: str, home: str) -> str:
    if real == home:
        return f"it is your home directory {home}, where your keys live"
    places = _home_places(home)
    held = next((p for p, _ in places if _inside(p, real)), None)
    return f"it holds {dict(places)[held]} {held}" if held else ""


def _home_places(home: str) -> list[tuple[str, str]]:
    """(resolved path, what it is) of each credential store and coi path under `home`."""
    return [*((p, "the credentials store") for p in _resolved(HOME_SECRETS, home)),
            *((p, "coi's own config and state") for p in _resolved(COI_HOME_PATHS, home))]


def check_secret_path(path: str, what: str, home: str, *, hint: str | None = None) -> str:
    """`path` resolved, when coi may read it to copy it into a container or an image (a
    tool's credential file, a CA certificate); else BadInput, one line starting with
    `what` (say "<config file>: <key>"): it is or lies in a credentials store of `home`
    (HOME_SECRETS) or a secret system path (SECRET_SYSTEM_PATHS, /root only when it
    is not `home`). Symlinks are resolved first, so a link to ~/.ssh/id_ed25519 is
    refused like the key itself."""
    real = os.path.realpath(path)
    home = os.path.realpath(home)
    places = [*_resolved(HOME_SECRETS, home),
              *(p for p in _resolved(SECRET_SYSTEM_PATHS) if p != home)]
    hit = next((p for p in places if _within(real, p)), None)
    if hit:
        shown = "" if real == os.path.abspath(path) else f" (it resolves to {real})"
        raise BadInput(f"{what} {path!r}{shown} lies in {hit}, which holds secrets: coi "
                       "copies nothing from there into a container or an image",
                       hint=hint or f"use a file outside {hit}")
    return real


def check_mount_targets(targets: Iterable[tuple[str, str]]) -> None:
    """Refuse container-side mount paths that are not absolute and normalised (no '.',
    '..', '//' or trailing '/'), that are "/", or that equal or nest in one another.

    `targets` is (what, path) of every mount of one container, the fixed /workspace
    and /storage included, so a --mount at /workspace (or inside it) collides with
    the workspace. The one-line error names both mounts.
    """
    seen: list[tuple[str, str]] = []
    for what, target in targets:
        _check_target(what, target)
        for other_what, other in seen:
            if target == other:
                raise BadInput(f"{what} and {other_what} both mount at {target!r}",
                               hint="give each mount a target of its own")
            if _inside(target, other) or _inside(other, target):
                raise BadInput(f"{what} at {target!r} and {other_what} at {other!r} lie "
                               "one inside the other",
                               hint="give each mount a target outside the others")
        seen.append((what, target))


def _check_target(what: str, target: str) -> None:
    if not isinstance(target, str) or not target.startswith("/") or \
            any(not c.isprintable() for c in target):
        raise BadInput(f"{what} target {_show(target)} must be an absolute path of "
                       "printable characters")
    if target == "/":
        raise BadInput(f"{what} target '/' would hide the container's own filesystem",
                       hint="mount it at a directory such as /data")
    if posixpath.normpath(target) != target or target.startswith("//"):
        raise BadInput(f"{what} target {_show(target)} is not normalised",
                       hint="write it without '.', '..', '//' or a trailing '/'")


def _resolved(paths: Sequence[str], under: str = "/") -> list[str]:
    """Each of `paths` (relative ones joined to `under`) with its symlinks resolved, so a
    guarded place reached through a link (~/.ssh -> /mnt/keys/ssh) is still guarded."""
    return [os.path.realpath(os.path.join(under, path)) for path in paths]


def _near(path: str, places: Sequence[str]) -> str | None:
    """The first of `places` that `path` is, lies in or holds."""
    return next((p for p in places if _within(path, p) or _inside(p, path)), None)


def _within(path: str, place: str) -> bool:
    return path == place or _inside(path, place)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def workspace_hash(path: str | os.PathLike[str]) -> str:
    """The first 8 hex digits of sha256 over the canonical workspace path."""
    # surrogateescape keeps undecodable file names hashable; valid UTF-8 is unchanged.
    data = canonical_workspace(path).encode("utf-8", "surrogateescape")
    import hashlib  # noqa: PLC0415 - OpenSSL's start-up, 2 ms, only where a name is made

    return hashlib.sha256(data).hexdigest()[:HASH_LEN]


def container_prefix(env: Mapping[str, str] | None = None) -> str:
    """The prefix from COI_CONTAINER_PREFIX (unset or empty: "coi-"), validated."""
    source = os.environ if env is None else env
    return validate_prefix(source.get(PREFIX_VARIABLE) or DEFAULT_PREFIX)


def container_name(workspace: str | os.PathLike[str], slot: int,
                   prefix: str | None = None) -> str:
    """`<prefix><hash8>-<slot>` for a workspace directory and a slot >= 1."""
    chosen = container_prefix() if prefix is None else validate_prefix(prefix)
    number = validate_slot(slot, SLOT_CEILING)
    return validate_container_name(f"{chosen}{workspace_hash(workspace)}-{number}")


def parse_container_name(name: object, prefix: str | None = None) -> tuple[str, int] | None:
    """(hash8, slot) when `name` is a container coi made under `prefix`, else None.

    The hash has a fixed length, so a name made under a longer prefix that
    starts with this one (`coi-test-…` against `coi-`) never matches.
    """
    chosen = container_prefix() if prefix is None else validate_prefix(prefix)
    if not isinstance(name, str):
        return None
    pattern = re.escape(chosen) + rf"([0-9a-f]{{{HASH_LEN}}})-([1-9][0-9]{{0,2}})"
    match = re.fullmatch(pattern, name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))
