"""What the rest of coi needs of the egress policy to hand a container to coi-net:
the modes, the container's fixed host-side interface name and NIC settings, and the
command lines of `coi-net apply` and `coi-net remove`. Everything else of the policy
(the ruleset, allowlist resolution, the cache) is coi-net's own (coi_net.policy).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Final

from coi_common.errors import BadInput
from coi_common.naming import validate_container_name

MODES: Final = ("restricted", "allowlist", "open")
DEFAULT_MODE: Final = "restricted"

IFNAME_PREFIX: Final = "coi"
IFNAME_HASH_LEN: Final = 12
IFNAME_PATTERN: Final = re.compile(r"coi[0-9a-f]{12}")
NIC_SECURITY: Final = ("security.ipv4_filtering", "security.mac_filtering",
                       "security.port_isolation")
MAX_REFRESH_MINUTES: Final = 10080
_PROJECT: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


# -- validation -------------------------------------------------------------------------


def validate_mode(mode: object) -> str:
    if mode not in MODES:
        raise BadInput(f"network mode {mode!r} is not one of {', '.join(MODES)}")
    return str(mode)


def validate_project(project: object) -> str:
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise BadInput(f"Incus project name {project!r} is not valid")
    return project


def validate_ifname(name: object) -> str:
    """A host-side interface name coi made (`coi` + 12 hex digits)."""
    if not isinstance(name, str) or not IFNAME_PATTERN.fullmatch(name):
        raise BadInput(f"interface name {name!r} is not one coi makes")
    return name


def validate_refresh_minutes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 0 <= value <= MAX_REFRESH_MINUTES:
        raise BadInput(f"refresh interval {value!r} must be whole minutes from 0 to "
                       f"{MAX_REFRESH_MINUTES} (0 turns automatic refresh off)")
    return value


# -- names on the host and the NIC -----------------------------------------------------------


def host_name_for(container: str, project: str = "default") -> str:
    """The fixed host-side veth name of a container: `coi` + 12 hex digits (15 chars,
    the kernel's limit), from the project and the container name."""
    validate_container_name(container)
    validate_project(project)
    digest = hashlib.sha256(f"{project}/{container}".encode()).hexdigest()
    return IFNAME_PREFIX + digest[:IFNAME_HASH_LEN]


def nic_settings(current: Mapping[str, str], ifname: str, mode: str, *,
                 nic_filtering: bool = True) -> dict[str, str]:
    """The NIC device as coi wants it: its settings plus the fixed host_name and, unless
    the mode is open, Incus's own MAC/IPv4 anti-spoofing and port isolation."""
    settings = {**current, "host_name": validate_ifname(ifname)}
    value = "true" if validate_mode(mode) != "open" and nic_filtering else "false"
    settings.update(dict.fromkeys(NIC_SECURITY, value))
    return settings


def net_device_override(container: str, *, network: str = "coibr0", mode: str = DEFAULT_MODE,
                        device: str = "eth0", project: str = "default",
                        nic_filtering: bool = True) -> dict[str, dict[str, str]]:
    """Devices to merge into a container's create request so its NIC has coi's fixed
    host-side name (and filtering) from the very first start.

    coi-shell: `devices = {**container_devices(...), **net_device_override(name, ...)}`,
    create stopped, run `coi-net apply NAME --mode MODE` (apply_argv), then start.
    """
    base = {"type": "nic", "network": network, "name": device}
    return {device: nic_settings(base, host_name_for(container, project), mode,
                                 nic_filtering=nic_filtering)}


def apply_argv(container: str, mode: str, *, allowed: Sequence[str] = (),
               resolvers: Sequence[str] = (), refresh_minutes: int | None = None,
               program: str = "coi-net") -> list[str]:
    """The command line that applies a container's rules, run as root (by coi as root,
    or by coi's host service for everyone else; never through sudo).

    `program` is coi-net's path (dispatch.find_executable).
    """
    argv = [program, "apply", validate_container_name(container), "--mode",
            validate_mode(mode)]
    for entry in allowed:
        argv.append(f"--allow={entry}")
    for resolver in resolvers:
        argv.append(f"--resolver={resolver}")
    if refresh_minutes is not None:
        argv.append(f"--refresh-minutes={validate_refresh_minutes(refresh_minutes)}")
    return argv


def remove_argv(container: str, *, program: str = "coi-net") -> list[str]:
    """The command line that removes a container's rules (the end-of-session hook)."""
    return [program, "remove", validate_container_name(container)]
