"""The registry of AI coding tools coi can run, each defined as data.

A tool is one TOML file shipped in `coi_common/tools/<name>.toml`; a user adds
or changes tools with `[tools.NAME]` tables in config, which the config loader
hands to load_registry(). A user table named like a shipped tool replaces just
the fields it sets. Adding a tool therefore needs no code: docs/tools.md
describes every field.

Definitions are checked strictly (exact types, no unknown fields, paths that
stay inside the home directory) because their values end up in `incus`
arguments, file pushes and image build scripts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from coi_common.config import config_files
from coi_common.errors import BadInput, CoiError, NotFound
from coi_common.naming import ENV_NAME, check_secret_path, validate_tool_name

HOME: Final = "/home/code"
"""Home of the tool user in every container, whatever the image's own users."""
TOOL_USER: Final = "code"
TOOL_UID: Final = 1000
DEFAULT_TOOL: Final = "claude"
TOOLS_DIR: Final = Path(__file__).with_name("tools")
"""Where the shipped definitions (and the dummy test tool's script) live."""
INSTALL_METHODS: Final = ("npm", "pip", "script", "none")

_BINARY: Final = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./+-]*")
# Package specs reach an install command line; shell metacharacters are kept out
# so that a definition can never smuggle in a second command.
_PACKAGE: Final = re.compile(r"[A-Za-z0-9@][A-Za-z0-9@/._~^=<>!:+,\[\]-]*")


@dataclass(frozen=True)
class Install:
    """How the image builder puts a tool into an image."""

    method: str = "none"
    package: str | None = None
    script: str | None = None


@dataclass(frozen=True)
class Tool:
    """One AI coding tool. Paths are relative to HOME (or the host home for credentials)."""

    name: str
    binary: str
    description: str = ""
    autonomous_args: tuple[str, ...] = ()
    resume_args: tuple[str, ...] = ()
    state_dirs: tuple[str, ...] = ()
    state_files: tuple[str, ...] = ()
    credential_files: tuple[str, ...] = ()
    settings_file: str | None = None
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Keys coi deep-merges into `settings_file` at each start (JSON values)."""
    inject_credentials: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    install: Install = field(default_factory=Install)
    version_args: tuple[str, ...] = ("--version",)
    source: str = ""
    """Where the definition came from: a file, a config label, or both joined by ' + '."""

    def command(self, resume: bool = False) -> list[str]:
        """The argv that starts the tool autonomously, continuing the last talk if `resume`."""
        return [self.binary, *self.autonomous_args, *(self.resume_args if resume else ())]

    def session_paths(self) -> tuple[str, ...]:
        """Absolute container paths that make up a saved session (dirs, then files)."""
        return tuple(f"{HOME}/{rel}" for rel in (*self.state_dirs, *self.state_files))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the definition."""
        return {
            "name": self.name, "description": self.description, "binary": self.binary,
            "autonomous_args": list(self.autonomous_args),
            "resume_args": list(self.resume_args), "state_dirs": list(self.state_dirs),
            "state_files": list(self.state_files),
            "credential_files": list(self.credential_files),
            "settings_file": self.settings_file, "settings": json_copy(self.settings),
            "inject_credentials": self.inject_credentials,
            "env": dict(self.env),
            "install": {k: v for k, v in vars(self.install).items() if v is not None},
            "version_args": list(self.version_args), "source": self.source,
        }


class _Invalid(Exception):
    """A field value is wrong; the message continues "field 'x' ..."."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_type(value)}")
    if "\0" in value or "\n" in value:
        raise _Invalid("must be one line of text")
    return value


def _nonempty(value: Any) -> str:
    text = _text(value)
    if not text:
        raise _Invalid("must not be empty")
    return text


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_type(value)}")
    return value


def _binary(value: Any) -> str:
    text = _nonempty(value)
    if not _BINARY.fullmatch(text):
        raise _Invalid(f"{text!r} is not a command name or absolute path")
    return text


def _args(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of strings, got {_type(value)}")
    for item in value:
        if not isinstance(item, str) or "\0" in item:
            raise _Invalid(f"must be a list of strings, has item {item!r}")
    return tuple(value)


def _home_path(value: Any) -> str:
    """A path relative to a home directory that cannot climb out of it."""
    text = _nonempty(value)
    if text.startswith(("/", "~")):
        raise _Invalid(f"{text!r} must be relative to the home directory "
                       "(write '.tool', not '/home/code/.tool' or '~/.tool')")
    if any(not c.isprintable() for c in text):
        raise _Invalid(f"{text!r} contains a control character")
    if any(part in ("", ".", "..") for part in text.split("/")):
        raise _Invalid(f"{text!r} may not contain '..', '.' or empty components")
    return text


def _home_paths(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be a list of paths, got {_type(value)}")
    return tuple(_home_path(item) for item in value)


def _optional_home_path(value: Any) -> str | None:
    return None if value == "" else _home_path(value)


def _env(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"must be a table of strings, got {_type(value)}")
    for key, item in value.items():
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise _Invalid(f"has {key!r}, which is not an environment variable name")
        if not isinstance(item, str) or "\0" in item:
            raise _Invalid(f"value of {key} must be a string, got {_type(item)}")
    return MappingProxyType(dict(value))


def _settings(value: Any) -> Mapping[str, Any]:
    """A table of JSON values (TOML dates and times have no JSON form)."""
    if not isinstance(value, Mapping):
        raise _Invalid(f"must be a table, got {_type(value)}")
    _json_value(value, "settings")
    return MappingProxyType(json_copy(value))


def _json_value(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _json_value(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _json_value(item, where)
    elif not isinstance(value, str | bool | int | float):
        raise _Invalid(f"{where} has {_type(value)}, which JSON cannot hold")


def json_copy(value: Any) -> Any:
    """A deep, mutable copy of JSON-like data (tables become dicts)."""
    if isinstance(value, Mapping):
        return {str(key): json_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_copy(item) for item in value]
    return value


def _install(value: Any) -> Install:
    if not isinstance(value, Mapping):
        raise _Invalid(f"must be a table with a method, got {_type(value)}")
    unknown = sorted(set(value) - {"method", "package", "script"})
    if unknown:
        raise _Invalid(f"has unknown key {unknown[0]!r} (known: method, package, script)")
    method = value.get("method")
    if method not in INSTALL_METHODS:
        raise _Invalid(f"method {method!r} is not one of {', '.join(INSTALL_METHODS)}")
    package, script = value.get("package"), value.get("script")
    _install_package(method, package)
    _install_script(method, script)
    return Install(method, package, script)


def _install_package(method: str, package: Any) -> None:
    if method not in ("npm", "pip"):
        if package is not None:
            raise _Invalid(f"package applies only to npm and pip, not {method}")
        return
    if not isinstance(package, str) or not _PACKAGE.fullmatch(package):
        raise _Invalid(f"method {method} needs a package name, got {package!r}")


def _install_script(method: str, script: Any) -> None:
    if method != "script":
        if script is not None:
            raise _Invalid(f"script applies only to method script, not {method}")
        return
    if not isinstance(script, str) or not script.strip() or "\0" in script:
        raise _Invalid("method script needs a non-empty script string")


def _type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


_FIELDS: Final[dict[str, Callable[[Any], Any]]] = {
    "name": _nonempty,
    "description": _text,
    "binary": _binary,
    "autonomous_args": _args,
    "resume_args": _args,
    "state_dirs": _home_paths,
    "state_files": _home_paths,
    "credential_files": _home_paths,
    "settings_file": _optional_home_path,
    "settings": _settings,
    "inject_credentials": _bool,
    "env": _env,
    "install": _install,
    "version_args": _args,
}
_REQUIRED: Final = ("binary",)


def _build(name: str, raw: Mapping[str, Any], sources: Mapping[str, str]) -> Tool:
    """Check every field of one merged definition and make the Tool.

    `sources` maps each field to the file or config label it came from, so an
    error points at the place to fix.
    """
    def fail(key: str, reason: str, hint: str | None = None) -> BadInput:
        where = sources.get(key) or " + ".join(dict.fromkeys(sources.values()))
        return BadInput(f"tool {name!r} in {where}: {reason}", hint=hint)

    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise fail(key, f"unknown field {key!r}", hint=f"known fields: {', '.join(_FIELDS)}")
        try:
            values[key] = _FIELDS[key](value)
        except _Invalid as exc:
            raise fail(key, f"field {key!r}: {exc}") from None
    _check_whole(name, values, fail)
    values.pop("name", None)
    origin = " + ".join(dict.fromkeys(sources.values()))
    return Tool(name=name, source=origin, **values)


def _check_whole(name: str, values: Mapping[str, Any],
                 fail: Callable[[str, str], BadInput]) -> None:
    """Checks that span fields: the name matches, required fields are there."""
    if values.get("name", name) != name:
        raise fail("name", f"field 'name' is {values['name']!r} but the tool is {name!r}")
    for key in _REQUIRED:
        if key not in values:
            raise fail(key, f"missing field {key!r}")
    if values.get("inject_credentials") and not values.get("credential_files"):
        raise fail("inject_credentials",
                   "field 'inject_credentials' is true but 'credential_files' is empty")


def _read_definition(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"tool definition {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise CoiError(f"cannot read tool definition {path}: {exc.strerror}") from None


def _tool_name(name: Any, source: str) -> str:
    try:
        return validate_tool_name(name)
    except BadInput as exc:
        raise BadInput(f"{source}: {exc.message}", hint=exc.hint) from None


def _shipped(directory: Path) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """name -> (raw table, field -> source) for every `*.toml` in `directory`."""
    found = {}
    for path in sorted(directory.glob("*.toml")):
        name = _tool_name(path.stem, str(path))
        raw = _read_definition(path)
        found[name] = (raw, dict.fromkeys(raw, str(path)) or {"": str(path)})
    return found


def _overlay(found: dict[str, tuple[dict[str, Any], dict[str, str]]],
             user_tools: Mapping[str, Any], source: str | Mapping[str, str]) -> None:
    """Lay the user's tables over the shipped ones, field by field."""
    def label(key: Any) -> str:
        if isinstance(source, str):
            return source
        return source.get(key, "config") if isinstance(key, str) else "config"

    if not isinstance(user_tools, Mapping):
        raise BadInput(f"{label(None)}: 'tools' must be a table of tool tables, "
                       f"got {_type(user_tools)}")
    for key, table in user_tools.items():
        where = label(key)
        name = _tool_name(key, where)
        if not isinstance(table, Mapping):
            raise BadInput(f"tool {name!r} in {where}: must be a table, got {_type(table)}")
        raw, sources = found.get(name, ({}, {}))
        found[name] = ({**raw, **table},
                       {**sources, **dict.fromkeys(table, where)} or {"": where})


def load_registry(user_tools: Mapping[str, Mapping[str, Any]] | None = None,
                  user_source: str | Mapping[str, str] = "config", *,
                  shipped_dir: Path | None = None, vouched: Collection[str] = (),
                  home: str | None = None) -> dict[str, Tool]:
    """Every known tool by name: the shipped definitions with the user's tables over them.

    `user_source` labels the user's tables in error messages: one label (a
    config file path, say) or a label per tool name, for tables that came
    from different files. `shipped_dir` replaces TOOLS_DIR, for tests.

    `credential_files` are copied from the host home (`home`, default ~) into
    containers: unless they come from a shipped definition or a source in `vouched`
    (the user's own config files), each is refused when it resolves into a credential
    store (naming.check_secret_path), so a workspace file cannot send ~/.ssh in.
    """
    found = _shipped(TOOLS_DIR if shipped_dir is None else shipped_dir)
    vouched = {*vouched, *(where for _, sources in found.values() for where in sources.values())}
    if user_tools is not None:
        _overlay(found, user_tools, user_source)
    registry = {name: _build(name, raw, sources) for name, (raw, sources) in found.items()}
    for name, (_, sources) in found.items():
        where = sources.get("credential_files")
        if where is not None and where not in vouched:
            _refuse_secret_credentials(registry[name], where,
                                       os.path.expanduser("~") if home is None else home)
    return registry


def _refuse_secret_credentials(tool: Tool, where: str, home: str) -> None:
    for rel in tool.credential_files:
        check_secret_path(os.path.join(home, rel),
                          f"{where}: tools.{tool.name}.credential_files", home,
                          hint="only a tool table in your own config file may name one there")


def get_tool(name: str, registry: Mapping[str, Tool]) -> Tool:
    """The tool called `name`; NotFound lists the names that do exist."""
    if isinstance(name, str) and name in registry:
        return registry[name]
    validate_tool_name(name)
    known = ", ".join(sorted(registry)) or "none"
    raise NotFound(f"unknown tool {name!r}", hint=f"known tools: {known}")


def registry_from_config(settings: Any) -> dict[str, Tool]:
    """The registry with the `[tools.NAME]` tables of an effective config over it; the
    credential files of tables from the system and user config files are vouched for,
    those of a workspace's `.coi.toml` (trusted or not) are checked. `tool.binary`,
    when set, is the program of the tool `tool.name` picks."""
    user = settings.tools
    registry = load_registry(user, {name: settings.source(f"tools.{name}") for name in user},
                             vouched=config_files(None, os.environ))
    binary, chosen = settings.get("tool.binary"), settings.get("tool.name")
    if binary and chosen in registry:
        try:
            registry[chosen] = dataclasses.replace(registry[chosen], binary=_binary(binary))
        except _Invalid as exc:
            raise BadInput(f"tool.binary (from {settings.source('tool.binary')}): "
                           f"{exc}") from None
    return registry
