"""Shared library of the coi executables: config, Incus client, naming, protocol, errors."""

from typing import Final

__version__: Final = "0.1.0"
