"""The throwaway builder container an image is made in, and publishing its result.

The builder is deleted whatever happens (success, failure, Ctrl-C, SIGTERM:
the entry wrapper turns SIGTERM into an exception, so the `with` block's exit
runs). Its output goes to the build log; a failing step shows the log's tail.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from coi_common import plan, proc
from coi_common.errors import CoiError, CommandFailed, IncusError
from coi_common.incus import ExecSpec, Incus
from coi_image import aliases
from coi_image.rootfs import log_tail

RECIPE: Final = Path(__file__).with_name("build-coi.sh")
SCRIPT_IN_BUILDER: Final = "/root/coi-build.sh"
CA_DIR: Final = "/usr/local/share/ca-certificates/coi"
CA_BUNDLE: Final = "/etc/ssl/certs/ca-certificates.crt"
BUILD_ENV: Final = {"DEBIAN_FRONTEND": "noninteractive", "NODE_EXTRA_CA_CERTS": CA_BUNDLE,
                    "SSL_CERT_FILE": CA_BUNDLE, "REQUESTS_CA_BUNDLE": CA_BUNDLE,
                    "PIP_CERT": CA_BUNDLE, "HOME": "/root"}
# Docker must install and start in the builder as it will in sessions.
BUILDER_CONFIG: Final = {"security.nesting": "true",
                         "security.syscalls.intercept.mknod": "true",
                         "security.syscalls.intercept.setxattr": "true"}
STATIC_DNS: Final = ("8.8.8.8", "8.8.4.4", "1.1.1.1")
NETWORK_TIMEOUT: Final = 60.0
STOP_SECONDS: Final = 30


@contextlib.contextmanager
def builder(client: Incus, base_alias: str, profile: str, prefix: str,
            log_path: str) -> Iterator[Builder]:
    """A started builder from base_alias, deleted on the way out."""
    name = f"{prefix}build-{secrets.token_hex(3)}"
    try:
        client.create_instance(name, base_alias, profiles=[profile], config=BUILDER_CONFIG,
                               start=True)
        yield Builder(client, name, log_path)
    finally:
        with contextlib.suppress(CoiError):
            client.delete_instance_force(name)


class Builder:
    """Commands and files for one running builder container."""

    def __init__(self, client: Incus, name: str, log_path: str) -> None:
        self.client = client
        self.name = name
        self.log_path = log_path

    def wait_for_network(self) -> str:
        """Block until eth0 has an IPv4 address; return it."""
        if plan.active():  # a planned builder does not exist to get one
            return "its address"
        deadline = time.monotonic() + NETWORK_TIMEOUT
        while time.monotonic() < deadline:
            address = self.client.ipv4_address(self.name)
            if address:
                return address
            time.sleep(0.5)
        raise CoiError(f"builder {self.name} got no IPv4 address within "
                       f"{NETWORK_TIMEOUT:.0f} s", hint="check the bridge: coi doctor")

    def resolves(self, host: str) -> bool:
        return self.run(["getent", "hosts", host], check=False) == 0

    def ensure_dns(self, host: str) -> bool:
        """If `host` does not resolve while the network is up, write static resolvers.

        Returns True when the fix was applied. coi never changes the Incus
        network itself: that would touch every container on the bridge.
        """
        if self.resolves(host):
            return False
        self.step("dns_static", *STATIC_DNS)
        if not self.resolves(host):
            raise CoiError(f"name resolution fails in the builder ({host}), even with "
                           f"static DNS servers", hint=f"see {self.log_path}")
        return True

    def push_ca_certificates(self, certificates: Sequence[Path]) -> None:
        """Every certificate into CA_DIR (as host-N-NAME.crt) in one exec: a tar of them,
        as base64 text on its stdin."""
        import base64  # noqa: PLC0415

        spec = ExecSpec(self.name, ("sh", "-c", f"mkdir -p {CA_DIR} && base64 -d | "
                                    f"tar -x --no-same-owner --no-same-permissions -C {CA_DIR}"))
        done = self.client.exec_capture(spec, timeout=60, input_text=base64.b64encode(
            _tar({f"host-{n}-{cert.stem}.crt": cert.read_bytes()
                  for n, cert in enumerate(certificates)})).decode("ascii"))
        if done.returncode != 0:
            raise CommandFailed(f"the CA certificates could not be copied into the builder: "
                                f"{proc.last_line(done.stderr) or f'exit {done.returncode}'}")

    def push_script(self, source: Path, target: str) -> None:
        self.client.push_file(self.name, str(source), target, mode="0755")

    def step(self, name: str, *args: str) -> None:
        """One step of the coi recipe; a failure shows the log's tail and raises."""
        self.run(["bash", SCRIPT_IN_BUILDER, name, *args])

    def run(self, argv: Sequence[str], *, check: bool = True,
            env: Mapping[str, str] | None = None, user: int | None = None) -> int:
        spec = ExecSpec(self.name, tuple(argv), user=user, env=env or BUILD_ENV)
        status = self.client.exec_logged(spec, self.log_path)
        if check and status != 0:
            print(log_tail(self.log_path), file=sys.stderr)
            raise CommandFailed(f"{' '.join(argv[:3])} failed in the builder (exit {status})",
                                hint=f"full log: {self.log_path}")
        return status

    def publish(self, alias: str, properties: Mapping[str, str], tmp_prefix: str) -> str:
        """Stop the builder and publish it under `alias` (staged, then swapped in).

        A clean shutdown first, so whatever an installer left running (npm
        post-install work) finishes before the rootfs is packed. A publish
        that Incus failed is tried once more on the stopped builder, after
        removing what the first one left; a builder that is gone (NotFound:
        Incus also reports a file missing from its rootfs so, as when a
        concurrent sweep removed it) and anything else (the daemon gone,
        Ctrl-C, SIGTERM) end the build, and `staged` removes the half-way
        image.
        """
        self.run(["sync"])
        try:
            self.client.set_state(self.name, "stop", timeout=STOP_SECONDS)
        except CoiError:
            self.client.set_state(self.name, "stop", force=True)
        with aliases.staged(self.client, alias, tmp_prefix) as tmp_alias:
            try:
                aliases.publish(self.client, self.name, tmp_alias, properties)
            except IncusError:
                aliases.drop_tmp_alias(self.client, tmp_alias, alias)
                aliases.publish(self.client, self.name, tmp_alias, properties)
            return aliases.swap_alias(self.client, tmp_alias, alias)


def _tar(files: Mapping[str, bytes]) -> bytes:
    """An uncompressed tar of `files` (name -> content), each root's and mode 0644."""
    import io  # noqa: PLC0415
    import tarfile  # noqa: PLC0415

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(content), 0o644
            archive.addfile(member, io.BytesIO(content))
    return buffer.getvalue()
