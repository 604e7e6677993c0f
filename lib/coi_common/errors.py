"""The failure kinds of coi, each with its exit code and stable machine code.

The table here is the single source of exit codes (docs/exit-codes.md lists it,
and a test keeps the two in step). Raise the most specific kind; the entry
wrapper (coi_common.entry) turns it into one stderr line and the exit code.
"""

from __future__ import annotations

from typing import ClassVar, Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_UNAVAILABLE: Final = 4
EXIT_PERMISSION: Final = 5
EXIT_INTERRUPTED: Final = 130


class CoiError(Exception):
    """Base of every error coi reports to a user; never shown with a traceback."""

    exit_code: ClassVar[int] = EXIT_FAILED
    code: ClassVar[str] = "failed"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the hint, if any, on one line."""
        text = " ".join(self.message.split())
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(CoiError):
    """The command line is wrong."""

    exit_code = EXIT_USAGE
    code = "usage"


class BadInput(CoiError):
    """Input data (stdin JSON, a name, a value) is malformed or out of range."""

    exit_code = EXIT_USAGE
    code = "bad_input"


class ConfigError(CoiError):
    """A config file or COI_* variable has an unknown key, wrong type or bad TOML."""

    exit_code = EXIT_USAGE
    code = "bad_config"


class NotFound(CoiError):
    """The named container, image, session or command does not exist."""

    exit_code = EXIT_NOT_FOUND
    code = "not_found"


class AlreadyExists(CoiError):
    """Something with that name exists already."""

    code = "already_exists"


class IncusUnavailable(CoiError):
    """incusd is not installed, not running or not answering."""

    exit_code = EXIT_UNAVAILABLE
    code = "incus_unavailable"


class PermissionDenied(CoiError):
    """The user may not do this (not in incus-admin, not root)."""

    exit_code = EXIT_PERMISSION
    code = "permission_denied"


class IncusError(CoiError):
    """Incus refused or failed a request; carries Incus's own message."""

    code = "incus_error"


class CommandFailed(CoiError):
    """An external program we ran exited non-zero."""

    code = "command_failed"


class Interrupted(CoiError):
    """Ctrl-C or SIGTERM stopped the command."""

    exit_code = EXIT_INTERRUPTED
    code = "interrupted"


ALL_ERRORS: Final[tuple[type[CoiError], ...]] = (
    CoiError,
    UsageError,
    BadInput,
    ConfigError,
    NotFound,
    AlreadyExists,
    IncusUnavailable,
    PermissionDenied,
    IncusError,
    CommandFailed,
    Interrupted,
)
