"""The kernel policy of every container coi makes for work (a session's, and `coi
container launch`'s): nesting, so Docker runs inside, and no setuid or setgid file, ever.

Root inside a container may chmod any file whose owner it maps, so without
this a setuid program planted in /workspace (or any host-backed mount) keeps
its bit on the host, where the user may run it. No mount flag or id map stops
the bit from being set: the kernel's seccomp filter does, for every process in
the container, including `incus exec` and the 32-bit syscall table (LXC's
`[all]` section; an int 0x80 chmod was refused, measured).

Refused with EPERM: chmod/fchmod/fchmodat with S_ISUID or S_ISGID, open/openat
with O_CREAT and such a mode, creat, mknod/mknodat of such a file. Refused with
ENOSYS, so callers fall back to the calls above: fchmodat2 and openat2 (their
mode cannot be inspected by seccomp) and io_uring_setup (its open operations
bypass syscall filters altogether).

Incus's `raw.seccomp` replaces the policy Incus would write (measured: the
file holds only the raw text), so Incus's default denials are repeated first.
Inside, installing a package that ships a setuid program fails at its chmod;
put such packages in the image (`coi build`), or set security.allow_setuid in
your own config (a workspace file cannot).

Docker must run inside: nesting is enough (measured: dockerd builds and runs an image
under this policy). No mknod interception: with it, incusd would make real device nodes
(null, zero, tty, ...) wherever the agent asks, /workspace on the host included.
"""

from __future__ import annotations

import errno
from typing import Final

S_ISUID: Final = 0o4000
S_ISGID: Final = 0o2000
O_CREAT: Final = 0o100
NESTING: Final = {"security.nesting": "true"}

INCUS_DEFAULT: Final = """2
denylist
[all]
reject_force_umount
[all]
kexec_load errno 38
open_by_handle_at errno 38
init_module errno 38
finit_module errno 38
delete_module errno 38
"""

# syscall -> (index of the mode argument, index of the flags argument or None)
MODE_ARGUMENTS: Final = {
    "chmod": (1, None), "fchmod": (1, None), "fchmodat": (2, None), "creat": (1, None),
    "open": (2, 1), "openat": (3, 2), "mknod": (1, None), "mknodat": (2, None),
}
NOT_IMPLEMENTED: Final = ("fchmodat2", "openat2", "io_uring_setup")


def _masked(index: int, bits: int) -> str:
    return f"[{index},{bits},SCMP_CMP_MASKED_EQ,{bits}]"


def no_setuid_policy() -> str:
    """The whole raw.seccomp text: Incus's defaults, then the setuid/setgid refusals."""
    lines = []
    for call, (mode, flags) in MODE_ARGUMENTS.items():
        for bit in (S_ISUID, S_ISGID):
            created = f" {_masked(flags, O_CREAT)}" if flags is not None else ""
            lines.append(f"{call} errno {errno.EPERM}{created} {_masked(mode, bit)}")
    lines += [f"{call} errno {errno.ENOSYS}" for call in NOT_IMPLEMENTED]
    return INCUS_DEFAULT + "\n".join(lines) + "\n"


def container_config(allow_setuid: bool) -> dict[str, str]:
    """The instance keys: nesting, and the no-setuid policy unless the user's own config
    allows setuid files (`security.allow_setuid`)."""
    return {**NESTING, **({} if allow_setuid else {"raw.seccomp": no_setuid_policy()})}
