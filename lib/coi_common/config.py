"""The one configuration loader of coi: layered TOML, a typed schema, a source per value.

Layers, lowest precedence first: built-in defaults, the system file, the user
file, the project's `.coi.toml`, `COI_<SECTION>_<KEY>` environment variables,
a `[profiles.NAME]` table chosen by the caller, and command-line flags. Each
layer replaces whole values key by key (a profile's `environment` is the one
merge: it is laid over `defaults.environment` name by name). Every mistake is
a ConfigError of one line naming where it was made. Config is data: nothing
in it is evaluated, and no `$VAR` in a value is expanded.

This module runs on every command, so it imports only cheap stdlib modules;
JSON and protocol code are imported where they are rendered.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import stat
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from coi_common import naming, sizes, trust
from coi_common.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """The type, default and limits of one config key."""

    kind: str  # "str", "bool", "int", "list" (of strings), "table" (string to string)
    # or "mounts" ([[mounts.default]] tables)
    default: Any
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None


SIZE_KEYS: Final = ("limits.session_size", "limits.sessions_total")
"""String keys that hold a byte size (coi_common.sizes), checked when they are read."""

# Workspace paths host programs obey (git runs hooks and config commands, and reads
# its config from the directory .git/commondir names; editors run tasks, devcontainer
# initializeCommand runs on the host, hook runners run what their config says, Claude
# Code loads settings and MCP servers): read-only inside. A trailing "/"
# marks a directory, so a missing one is made as an empty directory, not a file.
PROTECTED_PATHS: Final = (
    ".git/hooks/", ".git/config", ".git/config.worktree", ".git/commondir",
    ".git/info/attributes", ".git/worktrees/", ".git/modules/", ".coi.toml", ".mcp.json",
    ".claude/settings.json", ".claude/settings.local.json", ".husky/", ".vscode/",
    ".devcontainer/", ".pre-commit-config.yaml", "lefthook.yml", ".lefthook.yml",
)
# Names (shell patterns, anywhere in the workspace) shown empty inside; "!" excepts.
MASKED_FILES: Final = (
    ".env", ".env.*", "!.env.example", "*.pem", "id_rsa*", "id_ed25519*", ".npmrc",
    ".pypirc", "credentials.json",
)

SCHEMA: Final[Mapping[str, Mapping[str, Key]]] = {
    "defaults": {
        "image": Key("str", "coi"),
        "persistent": Key("bool", False),
        "mount_claude_config": Key("bool", True),
        "max_slots": Key("int", 10, minimum=1, maximum=99),
        "environment": Key("table", {}),
    },
    "pool": {
        "size": Key("int", 0, minimum=0, maximum=99),
        "end_in_background": Key("bool", True),
    },
    "tool": {
        "name": Key("str", "claude"),
        "binary": Key("str", ""),
    },
    "paths": {
        "sessions_dir": Key("str", "~/.coi/sessions"),
        "storage_dir": Key("str", "~/.coi/storage"),
        "logs_dir": Key("str", "~/.coi/logs"),
        "state_dir": Key("str", "~/.coi"),
    },
    "incus": {
        "project": Key("str", "default"),
        "group": Key("str", "incus-admin"),
        # coi's images make `code` uid 1000 and raw.idmap maps it: the key is accepted
        # (configs of the original name it) and held to that value.
        "claude_uid": Key("int", 1000, minimum=1000, maximum=1000),
        "profile": Key("str", "coi"),
        "pool": Key("str", "coi"),
        "network": Key("str", "coibr0"),
        "socket": Key("str", ""),
        "remote": Key("str", ""),
        "target": Key("str", ""),
    },
    "network": {
        "mode": Key("str", "restricted", choices=naming.NETWORK_MODES),
        "allowed_domains": Key("list", []),
        "refresh_interval_minutes": Key("int", 30, minimum=0),
        "resolvers": Key("list", []),
    },
    "limits": {
        "cpu": Key("str", ""),
        "memory": Key("str", "50%"),
        "processes": Key("int", 4096, minimum=0, maximum=1000000),
        "session_size": Key("str", "2GiB"),
        "sessions_total": Key("str", "20GiB"),
    },
    "security": {
        "protect": Key("bool", True),
        "protected_paths": Key("list", list(PROTECTED_PATHS)),
        "mask": Key("list", list(MASKED_FILES)),
        "allow_setuid": Key("bool", False),
    },
    "image": {
        "base": Key("str", ""),
        "tools": Key("list", []),
        "extra_ca_certificates": Key("list", []),
        "host_ca_certificates": Key("bool", True),
        "mirror": Key("str", ""),
    },
    "mounts": {
        # [[mounts.default]] tables (host, container, readonly), as the original coi
        # reads them; kept as `HOST:CONTAINER[:ro]`, the form of --mount.
        "default": Key("mounts", []),
    },
}

# Sections whose entries are named tables rather than schema keys.
TABLE_SECTIONS: Final = ("profiles", "tools")

# What each profile key overrides; the profile key takes the target's type.
PROFILE_TARGETS: Final[Mapping[str, str]] = {
    "image": "defaults.image",
    "persistent": "defaults.persistent",
    "environment": "defaults.environment",
    "tool": "tool.name",
    "network": "network.mode",
}

NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

SYSTEM_CONFIG: Final = "/etc/coi/config.toml"
PROJECT_FILE: Final = ".coi.toml"

DEFAULT_SOURCE: Final = "default"
CLI_SOURCE: Final = "command line"

_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})
_INT_TEXT: Final = re.compile(r"[+-]?[0-9]{1,18}")
"""Eighteen digits at most: a longer number is out of every key's range, and past
Python's 4300-digit limit int() itself would fail."""

# TOML basic-string escapes; the same text is valid in error messages and output.
_ESCAPES: Final = {
    # C0 and C1 controls and bidi overrides: never raw in a message or on a terminal.
    **{code: f"\\u{code:04x}" for code in [*range(0x20), *range(0x7F, 0xA0),
                                          *range(0x202A, 0x202F), *range(0x2066, 0x206A)]},
    ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r",
}


@dataclass(frozen=True)
class Config:
    """The effective configuration: a value and its source for every key.

    Keys are dotted: `defaults.persistent` for schema keys, `profiles.NAME`
    and `tools.NAME` for named tables. `values` keeps the order of items().
    """

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    files: tuple[str, ...] = ()
    profile: str | None = None

    def get(self, dotted_key: str) -> Any:
        """The value of `dotted_key`, copied so callers cannot change the config."""
        return copy.deepcopy(self.values[dotted_key])

    def source(self, dotted_key: str) -> str:
        """Where the value came from: "default", a file path, "env COI_X_Y",
        "profile NAME (<file>)" or "command line"."""
        return self.sources[dotted_key]

    def path(self, dotted_key: str) -> str:
        """A path-valued key with `~` expanded."""
        return expand_path(self.values[dotted_key])

    def section(self, name: str) -> dict[str, Any]:
        """The keys of one section (or the named tables of profiles/tools) as a dict."""
        if name not in SCHEMA and name not in TABLE_SECTIONS:
            raise KeyError(name)
        prefix = name + "."
        return {key[len(prefix):]: copy.deepcopy(value)
                for key, value in self.values.items() if key.startswith(prefix)}

    @property
    def profiles(self) -> dict[str, dict[str, Any]]:
        """The `[profiles.NAME]` tables, validated; source("profiles.NAME") is their file."""
        return self.section("profiles")

    @property
    def tools(self) -> dict[str, dict[str, Any]]:
        """The raw `[tools.NAME]` tables; source("tools.NAME") is the file for messages."""
        return self.section("tools")

    def items(self) -> Iterator[tuple[str, Any, str]]:
        """(dotted key, value, source) for every key: schema order, then profiles, then tools."""
        for key, value in self.values.items():
            yield key, copy.deepcopy(value), self.sources[key]


def expand_path(value: str) -> str:
    """Expand a leading `~` or `~user`; `$VAR` stays literal because config is data."""
    return os.path.expanduser(value)


def load(workspace: str | None = None, *, profile: str | None = None,
         cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         lenient: bool = False) -> Config:
    """Read every layer and return the effective configuration.

    `workspace` None leaves out the project file; `env` defaults to os.environ
    and also decides where the system and user files are. `cli` maps dotted
    keys to flag values; None values (flags not given) are skipped. Raises
    ConfigError for any invalid file, variable, flag or unknown profile, except
    that `lenient` leaves out a bad workspace file with a warning: commands that
    end or manage sessions must not be stopped by what the agent wrote there.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            values[f"{section}.{key}"] = copy.deepcopy(spec.default)
            sources[f"{section}.{key}"] = DEFAULT_SOURCE
    files = []
    paths = config_files(workspace, env)
    ignored: list[str] = []
    for path in paths:
        # The workspace's own file (last) is the container's to write: no link is
        # followed, and it may only tighten settings until the user trusts it.
        untrusted = workspace is not None and path == paths[-1]
        if untrusted:
            ignored = _apply_workspace_file(path, values, sources, files, lenient=lenient)
            continue
        read = _read_toml(path, follow_links=True)
        if read is not None:
            files.append(path)
            _apply_file(path, read[0], values, sources)
    for key in ignored:
        _warn_once(f"coi: ignoring {key} in {paths[-1]}: a workspace file may only tighten "
                   "settings; run 'coi trust' there to allow it")
    _apply_env(env, values, sources)
    if profile is not None:
        _apply_profile(profile, values, sources)
    if cli:
        _apply_cli(cli, values, sources)
    # Named tables were added as files were read; put them after the schema keys, by name.
    order = [k for k in values if k.split(".", 1)[0] not in TABLE_SECTIONS]
    for section in TABLE_SECTIONS:
        order += sorted(k for k in values if k.startswith(section + "."))
    return Config(values=types.MappingProxyType({k: values[k] for k in order}),
                  sources=types.MappingProxyType({k: sources[k] for k in order}),
                  files=tuple(files), profile=profile)


def config_files(workspace: str | None, env: Mapping[str, str]) -> list[str]:
    """The system, user, COI_CONFIG and project file paths, lowest precedence first
    (existing or not)."""
    system = env.get("COI_SYSTEM_CONFIG") or SYSTEM_CONFIG
    home = env.get("HOME") or os.path.expanduser("~")
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    config_home = xdg if os.path.isabs(xdg) else os.path.join(home, ".config")
    paths = [os.path.abspath(system), os.path.join(config_home, "coi", "config.toml")]
    extra = env.get(EXTRA_VARIABLE, "")
    if extra:  # the user's own extra file (as the original coi reads COI_CONFIG)
        paths.append(os.path.abspath(os.path.expanduser(extra)))
    if workspace is not None:
        paths.append(os.path.join(os.path.realpath(workspace), PROJECT_FILE))
    return paths


EXTRA_VARIABLE: Final = "COI_CONFIG"
MAX_CONFIG_BYTES: Final = 1 << 20
"""A config file larger than this is refused unread (no config needs more)."""


def _read_toml(path: str, *,
               follow_links: bool = True) -> tuple[dict[str, Any], str] | None:
    """The parsed file and the sha256 of its bytes, or None when it does not exist.

    Read safely, since the workspace's file is written by whatever runs inside the
    container: opened without blocking (a FIFO cannot hang coi), a regular file
    only (a link to /dev/zero is refused, not read forever), at most
    MAX_CONFIG_BYTES, nesting bounded by the parser (RecursionError is refused);
    the workspace layer does not follow a symbolic link at all (`follow_links`).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{path}: is a symbolic link; coi does not follow links for "
                              "this file") from None
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: cannot read: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB")
    try:
        return tomllib.loads(raw.decode("utf-8")), trust.digest(raw)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text at byte {exc.start}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


def _apply_workspace_file(path: str, values: dict[str, Any], sources: dict[str, str],
                          files: list[str], *, lenient: bool) -> list[str]:
    """The workspace's own file (the container's to write): no link followed, only
    tightening until trusted. Returns the keys it was refused."""
    before = dict(values), dict(sources)
    try:
        read = _read_toml(path, follow_links=False)
        if read is None:
            return []
        refused = narrow_untrusted(path, read, values, sources)
    except ConfigError as exc:
        if not lenient:
            raise
        values.clear()
        values.update(before[0])
        sources.clear()
        sources.update(before[1])
        _warn_once(f"coi: ignoring {path}: {exc.message}")
        return []
    files.append(path)
    return refused


def _warn_once(warning: str) -> None:
    if warning not in _WARNED:  # said once per process, however often config loads
        _WARNED.add(warning)
        print(warning, file=sys.stderr)


def _apply_file(path: str, data: Mapping[str, Any], values: dict[str, Any],
                sources: dict[str, str]) -> None:
    """Validate one parsed file and lay its values over `values`."""
    for section, table in data.items():
        if section in TABLE_SECTIONS:
            _apply_named_tables(path, section, table, values, sources)
            continue
        keys = SCHEMA.get(section)
        if keys is None:
            known = ", ".join([*SCHEMA, *TABLE_SECTIONS])
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}]), "
                              f"got {_describe(table)}")
        for key, value in table.items():
            dotted = f"{section}.{key}"
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {dotted} "
                                  f"(known in [{section}]: {', '.join(keys)})")
            values[dotted] = _check(path, dotted, keys[key], value)
            sources[dotted] = path


_WARNED: set[str] = set()
os.register_at_fork(after_in_child=_WARNED.clear)  # a fork is a program of its own
STRICTNESS: Final = {"open": 0, "restricted": 1, "allowlist": 2}
UNTRUSTED_KEYS: Final = ("defaults.image", "defaults.persistent", "defaults.max_slots")
"""What an untrusted workspace file may set freely: none of them widens access."""


def narrow_untrusted(path: str, read: tuple[dict[str, Any], str], values: dict[str, Any],
                     sources: dict[str, str]) -> list[str]:
    """Lay the workspace file over `values` as far as it only tightens them, unless the
    user trusted this content (`coi trust`); return the keys it was refused.

    Tightening: UNTRUSTED_KEYS, a stricter network.mode, a lower (non-zero)
    limits.processes, security.protect on, security.allow_setuid off, more protected
    paths or masked names (never a "!" exception). Everything else (allowlists,
    resolvers, tools and profiles, incus socket/project/profile, image CA certificates,
    credential toggles, paths, environment, memory and CPU limits, save quotas) widens
    or redirects access and is refused.
    """
    data, sha256 = read
    before, before_sources = dict(values), dict(sources)
    _apply_file(path, data, values, sources)  # validated in full either way
    if trust.trusted(expand_path(before["paths.state_dir"]), path, sha256):
        return []
    refused = [k for k, source in sources.items() if source == path
               and not _tightens(k, before.get(k), values[k])]
    for key in refused:
        if key in before:
            values[key], sources[key] = before[key], before_sources[key]
        else:
            del values[key], sources[key]
    return refused


def workspace_file(workspace: str) -> tuple[str, str | None]:
    """The workspace's config file and the sha256 of its content (None: no file),
    read as safely as the loader reads it and validated as TOML."""
    path = config_files(os.path.realpath(workspace), {"HOME": "/"})[-1]
    read = _read_toml(path, follow_links=False)
    return path, read[1] if read else None


def _tightens(key: str, old: Any, new: Any) -> bool:
    if key in UNTRUSTED_KEYS:
        return True
    if key == "network.mode":
        return STRICTNESS[new] >= STRICTNESS.get(old, 0)
    if key == "limits.processes":
        return 0 < new <= old or (old == 0 and new > 0)
    if key in ("security.protect", "security.allow_setuid"):
        return new in (key == "security.protect", old)
    if key in ("security.protected_paths", "security.mask"):
        added = set(new) - set(old or ())
        return set(old or ()) <= set(new) and not any(a.startswith("!") for a in added)
    return False


def _apply_named_tables(path: str, section: str, tables: Any, values: dict[str, Any],
                        sources: dict[str, str]) -> None:
    """[profiles.NAME] / [tools.NAME]: a later file replaces a table of the same name whole."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: {section} must be a table of [{section}.NAME] tables, "
                          f"got {_describe(tables)}")
    for name, raw in tables.items():
        dotted = f"{section}.{name}"
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"{path}: {section} name {quote(name)} must be 1 to 32 "
                              "characters of a-z, 0-9, '_' and '-', starting with a letter "
                              "or digit")
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: {dotted} must be a table, got {_describe(raw)}")
        table = dict(raw)
        if section == "profiles":
            table = {key: _check(path, f"{dotted}.{key}", _profile_key(path, dotted, key), value)
                     for key, value in raw.items()}
        values[dotted] = table
        sources[dotted] = path


def _profile_key(path: str, dotted: str, key: str) -> Key:
    if key not in PROFILE_TARGETS:
        raise ConfigError(f"{path}: unknown key {dotted}.{key} "
                          f"(known in a profile: {', '.join(PROFILE_TARGETS)})")
    section, name = PROFILE_TARGETS[key].split(".")
    return SCHEMA[section][name]


def _apply_env(env: Mapping[str, str], values: dict[str, Any], sources: dict[str, str]) -> None:
    """COI_<SECTION>_<KEY> variables (and COI_REMOTE and COI_TARGET, set by --remote and
    --target, the short names of COI_INCUS_REMOTE and COI_INCUS_TARGET); other COI_*
    variables belong to other parts of coi."""
    for short in ("REMOTE", "TARGET"):
        if f"COI_{short}" in env and f"COI_INCUS_{short}" not in env:
            env = {**env, f"COI_INCUS_{short}": env[f"COI_{short}"]}
    for variable in sorted(env):
        section = next((s for s in SCHEMA if variable.startswith(f"COI_{s.upper()}_")), None)
        if section is None:
            continue
        where = f"env {variable}"
        suffix = variable[len(section) + 5:]
        key = next((k for k in SCHEMA[section] if k.upper() == suffix), None)
        if key is None:
            raise ConfigError(f"{where}: unknown key {section}.{suffix.lower()} "
                              f"(known in [{section}]: {', '.join(SCHEMA[section])})")
        dotted = f"{section}.{key}"
        spec = SCHEMA[section][key]
        if spec.kind in ("table", "mounts"):
            raise ConfigError(f"{where}: {dotted} is made of tables and cannot be set from "
                              "the environment; set it in a config file")
        value = _parse_text(where, dotted, spec, env[variable])
        values[dotted] = _check(where, dotted, spec, value)
        sources[dotted] = where


def _apply_profile(name: str, values: dict[str, Any], sources: dict[str, str]) -> None:
    dotted = f"profiles.{name}"
    if dotted not in values:
        known = sorted(k.split(".", 1)[1] for k in values if k.startswith("profiles."))
        raise ConfigError(f"no profile {name!r} in the configuration "
                          f"(known: {', '.join(known) or 'none'})")
    where = f"profile {name} ({sources[dotted]})"
    for key, value in values[dotted].items():
        target = PROFILE_TARGETS[key]
        merged = {**values[target], **value} if key == "environment" else value
        values[target] = copy.deepcopy(merged)
        sources[target] = where


def _apply_cli(cli: Mapping[str, Any], values: dict[str, Any], sources: dict[str, str]) -> None:
    """Flag values by dotted key; strings are parsed like env values, since docopt gives text."""
    for dotted, raw in cli.items():
        if raw is None:
            continue
        section, _, key = dotted.partition(".")
        spec = SCHEMA.get(section, {}).get(key)
        if spec is None:
            raise ConfigError(f"{CLI_SOURCE}: unknown key {dotted}")
        value = raw
        if isinstance(raw, str) and spec.kind != "str":
            value = _parse_text(CLI_SOURCE, dotted, spec, raw)
        elif isinstance(raw, tuple):
            value = list(raw)
        values[dotted] = _check(CLI_SOURCE, dotted, spec, value)
        sources[dotted] = CLI_SOURCE


def _parse_text(where: str, dotted: str, spec: Key, text: str) -> Any:
    """Turn the text of an env variable (or a flag) into a value of the key's type."""
    word = text.strip()
    if spec.kind == "bool":
        if word.lower() in _TRUE_WORDS:
            return True
        if word.lower() in _FALSE_WORDS:
            return False
        raise ConfigError(f"{where}: {dotted} must be a boolean (true/false, yes/no, on/off, "
                          f"1/0), got {quote(text)}")
    if spec.kind == "int":
        if not _INT_TEXT.fullmatch(word):
            raise ConfigError(f"{where}: {dotted} must be an integer, got {quote(text)}")
        return int(word)
    if spec.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _check(where: str, dotted: str, spec: Key, value: Any) -> Any:
    """`value` if it fits `spec` (lists and tables copied), else a ConfigError."""
    if spec.kind == "list" and isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(f"{where}: {dotted} must be a list of strings, "
                                  f"got {_describe(item)} in the list")
        return list(value)
    if spec.kind == "mounts" and isinstance(value, list):
        return [_mount_spec(where, f"{dotted}[{n}]", item) for n, item in enumerate(value)]
    if spec.kind == "table" and isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(item, str):
                raise ConfigError(f"{where}: {dotted}.{name} must be a string, "
                                  f"got {_describe(item)}")
        return dict(value)
    fits = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        # bool is a subclass of int; `max_slots = true` is a mistake, not 1.
        "int": isinstance(value, int) and not isinstance(value, bool),
    }.get(spec.kind, False)
    if not fits:
        raise ConfigError(f"{where}: {dotted} must be {_expected(spec)}, got {_describe(value)}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{where}: {dotted} must be one of {', '.join(spec.choices)}, "
                          f"got {_describe(value)}")
    if dotted in SIZE_KEYS and not _is_size(value):
        raise ConfigError(f"{where}: {dotted} must be 0 or a size such as \"2GiB\" or "
                          f"\"512MiB\", got {_describe(value)}")
    too_low = spec.minimum is not None and value < spec.minimum
    too_high = spec.maximum is not None and value > spec.maximum
    if too_low or too_high:
        raise ConfigError(f"{where}: {dotted} must be {_expected(spec)}, got {_describe(value)}")
    return value


MOUNT_KEYS: Final = {"host": str, "container": str, "readonly": bool}


def _mount_spec(where: str, dotted: str, table: Any) -> str:
    """One [[mounts.default]] table as `HOST:CONTAINER[:ro]` (the host path as written:
    ~ is expanded, and the path checked, where a session uses it)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {dotted} must be a table (host, container, readonly), "
                          f"got {_describe(table)}")
    for key, value in table.items():
        if key not in MOUNT_KEYS:
            raise ConfigError(f"{where}: unknown key {dotted}.{key} (known: host, container, "
                              "readonly)")
        if not isinstance(value, MOUNT_KEYS[key]):
            raise ConfigError(f"{where}: {dotted}.{key} must be "
                              f"{'a boolean' if key == 'readonly' else 'a string'}, "
                              f"got {_describe(value)}")
    for key in ("host", "container"):
        if not table.get(key) or ":" in table[key]:
            raise ConfigError(f"{where}: {dotted}.{key} must be a path without ':', "
                              f"got {_describe(table.get(key, ''))}")
    return f"{table['host']}:{table['container']}" + (":ro" if table.get("readonly") else "")


def _is_size(text: str) -> bool:
    try:
        sizes.parse_size(text)
    except ValueError:
        return False
    return True


def _expected(spec: Key) -> str:
    if spec.kind == "int" and spec.maximum is not None:
        return f"an integer from {spec.minimum} to {spec.maximum}"
    if spec.kind == "int" and spec.minimum is not None:
        return f"an integer of {spec.minimum} or more"
    return {"str": "a string", "bool": "a boolean", "int": "an integer",
            "list": "a list of strings", "table": "a table of strings",
            "mounts": "[[mounts.default]] tables"}[spec.kind]


def _describe(value: Any) -> str:
    """How a wrong value reads in a one-line message: its TOML type and, if short, itself."""
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {quote(shown)}"
    if isinstance(value, list):
        return "an array"
    return "a table" if isinstance(value, dict) else "a date/time"


def quote(text: str) -> str:
    """`text` as a TOML basic string, safe on a terminal and in a one-line message."""
    return '"' + text.translate(_ESCAPES) + '"'
