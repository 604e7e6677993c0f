"""The incus client's own remotes: where `[incus] remote = "NAME"` (or COI_REMOTE)
points, and the certificates that authenticate both ends (docs/remote.md).

coi adds no remote itself: `incus remote add NAME TOKEN` does, and writes
`config.yml`, the client's `client.crt`/`client.key` and the server's certificate
`servercerts/NAME.crt` into the client's directory ($INCUS_CONF, else
~/.config/incus). This module reads those files (bounded), accepts only an `incus`
remote over HTTPS with a pinned server certificate, and says what to fix otherwise.
The file is the small YAML the client writes (`remotes:` holding one mapping of
plain scalars per remote); anything else in it is refused, never guessed at.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Final, NamedTuple

from coi_common.errors import BadInput, ConfigError, PermissionDenied

MAX_FILE_BYTES: Final = 1 << 20
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
ADDRESS: Final = re.compile(r"https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?/?")
DEFAULT_PORT: Final = 8443
ADD_HINT: Final = "add it with: incus remote add NAME TOKEN (a token from 'incus config trust add')"


class Remote(NamedTuple):
    """An Incus server reached over HTTPS with a client certificate."""

    name: str
    host: str
    port: int
    project: str
    client_cert: str
    client_key: str
    server_cert: str

    def where(self) -> str:
        return f"remote {self.name} (https://{self.host}:{self.port})"


def conf_dir() -> str:
    return os.environ.get("INCUS_CONF") or os.path.join(os.path.expanduser("~"), ".config",
                                                        "incus")


def find(name: str, folder: str | None = None) -> Remote:
    """Remote `name` of the client's configuration, checked; ConfigError names the fix."""
    if not NAME.fullmatch(name):
        raise BadInput(f"{name!r} is not a remote name")
    folder = folder or conf_dir()
    path = os.path.join(folder, "config.yml")
    entries = remotes_in(_read(path))
    if name not in entries:
        raise ConfigError(f"the incus client knows no remote {name!r} ({path})", hint=ADD_HINT)
    entry = entries[name]
    if entry.get("protocol", "incus") != "incus" or entry.get("auth_type", "tls") != "tls":
        raise ConfigError(f"remote {name!r} is not an Incus server reached with a client "
                          "certificate (protocol incus, auth_type tls)")
    matched = ADDRESS.fullmatch(entry.get("addr", ""))
    if not matched:
        raise ConfigError(f"remote {name!r} has the address {entry.get('addr', '')!r}; "
                          "coi reaches remotes over https://HOST[:PORT] only")
    port = int(matched.group(2) or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ConfigError(f"remote {name!r} has the port {port}")
    files = (os.path.join(folder, "client.crt"), os.path.join(folder, "client.key"),
             os.path.join(folder, "servercerts", f"{name}.crt"))
    for file in files:
        if not os.path.isfile(file):
            raise ConfigError(f"remote {name!r}: {file} is missing", hint=ADD_HINT)
    return Remote(name, matched.group(1).strip("[]"), port, entry.get("project", "default"),
                  *files)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"the incus client has no configuration ({path})",
                          hint=ADD_HINT) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than 1 MiB; not read")
    return data.decode("utf-8", "replace")


def remotes_in(text: str) -> dict[str, dict[str, str]]:
    """The `remotes:` block of the client's config.yml: name -> its scalar fields."""
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    inside = False
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, colon, value = line.strip().partition(":")
        if not colon:
            raise ConfigError(f"the incus client's config.yml has a line coi cannot read: "
                              f"{line.strip()[:60]!r}")
        if indent == 0:
            inside, current = key == "remotes", None
        elif inside and indent == 2:
            current = found.setdefault(_scalar(key), {})
        elif inside and indent == 4 and current is not None:
            current[key] = _scalar(value.strip())
    return found


def _scalar(text: str) -> str:
    """A plain or quoted YAML scalar as the client writes them."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def dialer(remote: Remote) -> Callable[[float], socket.socket]:
    """Opens TLS connections to `remote` for httpunix.Connection: our client certificate,
    and exactly the pinned server certificate (its chain checked, then its bytes
    compared: a server presenting any other certificate is refused). ssl is imported
    here, so only a remote's users pay its ~12 ms."""
    import ssl  # noqa: PLC0415

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # an Incus certificate names the host, not its address
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(remote.client_cert, remote.client_key)
        context.load_verify_locations(remote.server_cert)
        with open(remote.server_cert, encoding="ascii") as handle:
            pinned = ssl.PEM_cert_to_DER_cert(handle.read(MAX_FILE_BYTES))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"the certificates of remote {remote.name!r} cannot be used: "
                          f"{exc}", hint=ADD_HINT) from None

    def dial(timeout: float) -> socket.socket:
        raw = socket.create_connection((remote.host, remote.port), timeout=timeout)
        try:
            sock = context.wrap_socket(raw, server_hostname=None)
        except ssl.SSLCertVerificationError:
            raw.close()
            raise PermissionDenied(f"{remote.where()} presented a certificate other than "
                                   "the one pinned for it", hint="if the server really changed, "
                                   f"run: incus remote remove {remote.name}, then add it "
                                   "again") from None
        except BaseException:
            raw.close()
            raise
        if sock.getpeercert(binary_form=True) != pinned:
            sock.close()
            raise PermissionDenied(f"{remote.where()} presented a certificate other than "
                                   "the one pinned for it")
        return sock

    return dial
