"""The one module of coi that owns nftables.

Every change is a list of nftables JSON commands applied as ONE transaction:
libnftables turns one buffer into one netlink batch, which the kernel
applies whole or not at all. Rules are data (built by coi_net.policy),
never text pasted together.

The binding is a few lines of ctypes over `libnftables.so.1` (a dependency
of the `nftables` package): ~3-5 ms for a table with a 1,000-element set,
against ~10-25 ms for the `nft -j -f -` program, which is the fallback when
the library cannot be loaded (said once on stderr). pyroute2's nftables API
is not used: it cannot make interval sets nor batch several changes in one
transaction (measured; docs/network.md).

coi touches only its own tables: `coi` in the `bridge` and `inet` families,
or the name in $COI_NFT_TABLE (tests use `coi_test_<hex>`). `run()` refuses
any command that names another table, so a bug elsewhere cannot reach a
user's own rules.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from coi_common import proc
from coi_common.errors import BadInput, CoiError, CommandFailed, NotFound, PermissionDenied

if TYPE_CHECKING:
    import ctypes

TABLE_VARIABLE: Final = "COI_NFT_TABLE"
DEFAULT_TABLE: Final = "coi"
TABLE_PATTERN: Final = re.compile(r"coi(_[a-z0-9]{1,24}){0,3}")
"""Our table names: `coi`, or `coi_` words (tests: coi_test_<hex>); never anyone else's."""

FAMILIES: Final = ("bridge", "inet")
LIBRARY: Final = "libnftables.so.1"
_OUTPUT_JSON: Final = 1 << 4  # NFT_CTX_OUTPUT_JSON
_OBJECTS: Final = ("table", "chain", "rule", "set", "map", "element", "counter", "flowtable")
_VERBS: Final = ("add", "create", "insert", "replace", "delete", "flush", "list", "reset")

Command = dict[str, Any]


def table_name(env: Mapping[str, str] | None = None) -> str:
    """coi's table name: $COI_NFT_TABLE when set (validated), else `coi`."""
    source = os.environ if env is None else env
    name = source.get(TABLE_VARIABLE) or DEFAULT_TABLE
    if not TABLE_PATTERN.fullmatch(name):
        raise BadInput(f"{TABLE_VARIABLE} {name!r} is not a coi table name",
                       hint="use 'coi' or 'coi_' followed by lowercase words, e.g. coi_test_1a2b")
    return name


@dataclass
class Stats:
    """What this process sent: counted so benchmarks and tests can prove 'one transaction'."""

    transactions: int = 0
    commands: int = 0
    backend: str = ""
    history: list[int] = field(default_factory=list)


STATS: Final = Stats()


class _Library:
    """A libnftables context with buffered output and JSON in and out."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        import ctypes  # noqa: PLC0415 - only root applies rules: members skip its 1.5 ms

        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        # JSON output also makes libnftables parse its input as JSON (nftables 1.0.x).
        lib.nft_ctx_output_set_flags(self._ctx, _OUTPUT_JSON)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, text: str) -> tuple[int, str, str]:
        code = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        return code, out, err


_library: _Library | None = None
_backend: str = ""


def backend() -> str:
    """`libnftables` or `nft` (the program), deciding once per process."""
    global _library, _backend  # noqa: PLW0603 - one context per process, made on first use
    if _backend:
        return _backend
    if os.environ.get("COI_NFT_BACKEND") == "nft":
        _backend = "nft"
        return _backend
    import ctypes  # noqa: PLC0415

    try:
        _library = _Library(ctypes.CDLL(LIBRARY))
        _backend = "libnftables"
    except OSError as exc:
        print(f"coi: {LIBRARY} not usable ({exc}); using the slower `nft -j -f -`",
              file=sys.stderr)
        _backend = "nft"
    return _backend


def _execute(text: str) -> tuple[int, str, str]:
    if backend() == "libnftables" and _library is not None:
        return _library.run(text)
    try:
        done = proc.run(["nft", "-j", "-f", "-"], input_text=text, check=False, timeout=60)
    except NotFound:
        raise CommandFailed("neither libnftables nor the nft program is installed",
                            hint="install the nftables package") from None
    return done.returncode, done.stdout, done.stderr


def _error(stderr: str) -> CoiError:
    lines = [line.strip() for line in stderr.splitlines()
             if line.strip() and not set(line.strip()) <= {"^", " "}]
    text = next((line for line in lines if "Error" in line), lines[0] if lines else "")
    text = text.replace("internal:0:0-0: ", "")
    if "Operation not permitted" in stderr or "Permission denied" in stderr:
        return PermissionDenied(f"nftables: {text or 'operation not permitted'}",
                                hint="coi-net changes firewall rules: run it as root "
                                     "(sudo coi-net ...)")
    return CommandFailed(f"nftables refused the change: {text or 'no reason given'}")


def check_ours(commands: Iterable[Command], table: str) -> None:
    """Refuse any command that is not about `table` in the bridge or inet family."""
    for command in commands:
        if not isinstance(command, dict) or len(command) != 1:
            raise BadInput(f"not an nftables command: {command!r:.80}")
        verb, body = next(iter(command.items()))
        if verb not in _VERBS or not isinstance(body, dict) or len(body) != 1:
            raise BadInput(f"not an nftables command: {command!r:.80}")
        kind, obj = next(iter(body.items()))
        if kind not in _OBJECTS or not isinstance(obj, dict):
            raise BadInput(f"not an nftables command: {command!r:.80}")
        name = obj.get("name") if kind == "table" else obj.get("table")
        if obj.get("family") not in FAMILIES or name != table:
            raise BadInput(f"refusing an nftables command outside coi's table {table!r}: "
                           f"{verb} {kind} {obj.get('family')} {name}")


def run(commands: Sequence[Command], *, table: str) -> None:
    """Apply `commands` as ONE transaction; all or nothing. Empty is a no-op."""
    if not commands:
        return
    check_ours(commands, table)
    text = json.dumps({"nftables": list(commands)})
    code, _out, err = _execute(text)
    STATS.transactions += 1
    STATS.commands += len(commands)
    STATS.backend = backend()
    STATS.history.append(len(commands))
    if code != 0:
        raise _error(err)


def list_table(family: str, table: str) -> list[dict[str, Any]]:
    """The objects of one of our tables as nftables JSON items; [] when it does not exist."""
    check_ours([{"list": {"table": {"family": family, "name": table}}}], table)
    code, out, err = _execute(json.dumps(
        {"nftables": [{"list": {"table": {"family": family, "name": table}}}]}))
    if code != 0:
        if "No such file or directory" in err:
            return []
        raise _error(err)
    try:
        items = json.loads(out or "{}").get("nftables", [])
    except json.JSONDecodeError:
        raise CommandFailed(f"nftables printed something that is not JSON: {out[:80]!r}") \
            from None
    return [item for item in items if "metainfo" not in item]


def dump(commands: Sequence[Command]) -> str:
    """The exact JSON text `run()` would send, for --dry-run."""
    return json.dumps({"nftables": list(commands)}, indent=1)
