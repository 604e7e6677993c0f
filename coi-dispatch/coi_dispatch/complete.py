"""Shell completion: `coi completion SHELL` prints the script, and the script runs
`coi __complete CWORD WORD...` at each TAB (WORD... the words after `coi`, CWORD the
index of the one under the cursor, 1 for the first), which prints the candidates,
one a line, nothing when the shell should complete file names itself.

Commands, subcommands and flags come from grammar.py (made from every executable's
usage by docs/generate.py); live names (containers, images) from Incus, kept for
CACHE_SECONDS in ~/.cache/coi/completion.json so that a burst of TABs makes one
request; saved sessions, profiles and tools from the user's own files.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from coi_common.commands import ALIASES, COMMANDS
from coi_common.errors import CoiError, UsageError
from coi_dispatch.grammar import GRAMMAR

CACHE_SECONDS: Final = 5.0
CACHE_MAX_BYTES: Final = 1 << 20
SHELLS: Final = ("bash", "zsh", "fish")
CONSTANTS: Final = {"modes": ("restricted", "allowlist", "open"), "formats": ("text", "json"),
                    "shells": SHELLS}
TOP_FLAGS: Final = ("--help", "--version", "--debug")
SESSION_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
EMPTY: Final[dict[str, Any]] = {"commands": {}, "flags": [], "values": {}, "args": []}


def answer(argv: Sequence[str]) -> int:
    """`coi __complete CWORD WORD...`: print the candidates for the word at CWORD."""
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        raise UsageError("coi __complete takes the index of the current word, then the words")
    cword, words = int(argv[0]), list(argv[1:])
    typed, current = words[:cword - 1], words[cword - 1] if len(words) >= cword else ""
    for candidate in candidates(typed, current):
        print(candidate)
    return 0


def candidates(typed: Sequence[str], current: str, *,
               names: Callable[[str], Iterable[str]] | None = None) -> list[str]:
    """What may stand at `current` after the words `typed` (the words after `coi`),
    those starting with `current`, in order. `names` gives the live names of a kind
    (default: live_names)."""
    found = _possible([w for w in typed if w != "--debug"], current, names or live_names)
    return list(dict.fromkeys(c for c in found if c.startswith(current)))


def _possible(typed: list[str], current: str,
              names: Callable[[str], Iterable[str]]) -> Iterable[str]:
    if not typed:
        return TOP_FLAGS if current.startswith("-") else [
            *(c.name for c in COMMANDS), *ALIASES]
    node, positionals, expecting = _walk([*ALIASES.get(typed[0], typed[:1]), *typed[1:]])
    if expecting is not None:
        return names(node["values"][expecting])
    if current.startswith("-"):
        return [*node["flags"], "--help"] if node["flags"] else []
    if node["commands"] and not positionals:
        return list(node["commands"])
    return names(_argument_kind(node["args"], len(positionals)))


def _walk(typed: list[str]) -> tuple[dict[str, Any], list[str], str | None]:
    """The grammar node the words reach (subcommands followed), the positional words
    typed, and the flag whose value comes next (None)."""
    node: dict[str, Any] = GRAMMAR.get(typed[0]) or EMPTY
    if "--" in typed[1:]:  # the rest is a command of its own (`coi run -- ...`)
        return EMPTY, [], None
    positionals: list[str] = []
    expecting = None
    for word in typed[1:]:
        if expecting is not None:
            expecting = None
        elif word.startswith("-"):
            expecting = word if word in node["values"] else None
        elif not positionals and word in node["commands"]:
            node = node["commands"][word]
        else:
            positionals.append(word)
    return node, positionals, expecting


def _argument_kind(args: Sequence[Sequence[Any]], typed: int) -> str:
    """The kind of the next positional argument ("" none: the shell's own completion)."""
    if not args or (typed >= len(args) and not args[-1][1]):
        return ""
    return str(args[min(typed, len(args) - 1)][0])


def live_names(kind: str) -> list[str]:
    """The names of `kind`; nothing when it cannot be known (completion never fails)."""
    readers: dict[str, Callable[[], list[str]]] = {
        "containers": lambda: _cached(f"containers {_prefix()}", _containers),
        "images": lambda: _cached("images", _images), "sessions": _sessions,
        "profiles": _profiles, "tools": _tools,
        "commands": lambda: [c.name for c in COMMANDS],
        **{name: lambda values=values: list(values) for name, values in CONSTANTS.items()}}
    try:
        return readers[kind]() if kind in readers else []
    except (CoiError, OSError, ValueError):
        return []


def _prefix() -> str:
    from coi_common.naming import container_prefix  # noqa: PLC0415

    return container_prefix()


def _containers() -> list[str]:
    from coi_common.incus import Incus  # noqa: PLC0415

    return sorted(i["name"] for i in Incus(timeout=2).instances(_prefix()))


def _images() -> list[str]:
    from coi_common.incus import Incus  # noqa: PLC0415

    return sorted({alias["name"] for image in Incus(timeout=2).images()
                   for alias in image.get("aliases") or ()})


def _config() -> Any:
    from coi_common import config  # noqa: PLC0415

    return config.load(None, lenient=True)


def _sessions() -> list[str]:
    from coi_common.config import expand_path  # noqa: PLC0415

    root = expand_path(_config().get("paths.state_dir"))
    found = []
    for store in os.scandir(root):
        if store.name.startswith("sessions-") and store.is_dir(follow_symlinks=False):
            found += [entry.name for entry in os.scandir(store.path)
                      if SESSION_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)]
    return sorted(found, reverse=True)


def _profiles() -> list[str]:
    return sorted(_config().profiles())


def _tools() -> list[str]:
    from coi_common.tools import registry_from_config  # noqa: PLC0415

    return sorted(registry_from_config(_config()))


def _fresh(entry: Any, now: float) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("at"), int | float) and \
        0 <= now - entry["at"] < CACHE_SECONDS


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coi", "completion.json")


def _cached(key: str, reader: Callable[[], list[str]]) -> list[str]:
    """`reader()`, or what it gave within CACHE_SECONDS (kept in the user's cache under
    `key`)."""
    path, now = _cache_path(), time.time()
    cache: dict[str, Any] = {}
    try:
        with open(path, "rb") as file:
            cache = json.loads(file.read(CACHE_MAX_BYTES) or b"{}")  # cut short: not JSON
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    entry = cache.get(key)
    if _fresh(entry, now) and isinstance(entry.get("names"), list):
        return [n for n in entry["names"] if isinstance(n, str)]
    names = reader()
    # Only the fresh entries stay: the file never grows.
    cache = {k: v for k, v in cache.items() if _fresh(v, now)} | {key: {"at": now, "names": names}}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(cache, file)
    os.replace(temporary, path)
    return names


# -- the scripts ------------------------------------------------------------------------------

BASH: Final = r"""# coi completion for bash: eval "$(coi completion bash)" (or save it as
# ~/.local/share/bash-completion/completions/coi)
_coi() {
  local IFS=$'\n'
  COMPREPLY=($(coi __complete "$COMP_CWORD" "${COMP_WORDS[@]:1}" 2>/dev/null))
}
complete -o default -o nosort -F _coi coi 2>/dev/null || complete -o default -F _coi coi
"""

ZSH: Final = r"""#compdef coi
# coi completion for zsh: source <(coi completion zsh) (or save it as _coi in $fpath)
_coi() {
  local -a found
  found=("${(@f)$(coi __complete $((CURRENT - 1)) "${(@)words[2,-1]}" 2>/dev/null)}")
  if (( ${#found} )) && [[ -n ${found[1]} ]]; then
    compadd -Q -- "${found[@]}"
  else
    _files
  fi
}
if (( $+functions[compdef] )); then
  compdef _coi coi
else
  autoload -Uz compinit && compinit -u && compdef _coi coi
fi
"""

FISH: Final = r"""# coi completion for fish: coi completion fish | source
# (or save it as ~/.config/fish/completions/coi.fish)
function __coi_complete
    set -l tokens (commandline -opc)
    set -l current (commandline -ct)
    set -l found (coi __complete (count $tokens) $tokens[2..-1] $current 2>/dev/null)
    if test (count $found) -gt 0
        printf '%s\n' $found
    else
        __fish_complete_path $current
    end
end
complete -c coi -f -a '(__coi_complete)'
"""


def script(shell: str) -> str:
    scripts = {"bash": BASH, "zsh": ZSH, "fish": FISH}
    if shell not in scripts:
        raise UsageError(f"no completion for shell {shell!r}; one of: {', '.join(SHELLS)}")
    return scripts[shell].rstrip("\n")
