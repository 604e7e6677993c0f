"""`coi build` and `coi build custom`: make an image in a builder and publish it.

Both are cached by a recipe hash stored on the image (`coi.recipe_hash`):
when nothing that goes into the image changed, the build says "up to date"
without creating anything. The result is published under a temporary alias
and swapped in only when complete, so the previous image stays usable
until the new one is ready.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from coi_common import __version__, config, incus, naming, tools
from coi_common.errors import BadInput, ConfigError, NotFound
from coi_common.progress import Progress
from coi_common.protocol import make_record, write_record
from coi_image import base as base_mod
from coi_image.builder import RECIPE, SCRIPT_IN_BUILDER, Builder, builder

HOST_CA_DIR: Final = Path("/usr/local/share/ca-certificates")
MAX_CERTIFICATE_BYTES: Final = 1 << 20
"""An extra CA file larger than this is refused unread: a bundle of hundreds is smaller."""
PEM_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
PEM_PRIVATE_KEY: Final = b"PRIVATE KEY"
"""In the header of every PEM private key: PKCS#8, RSA, EC, ENCRYPTED, OPENSSH, PGP."""
CUSTOM_SCRIPT_IN_BUILDER: Final = "/root/coi-custom.sh"
RECIPE_VERSION: Final = 2
"""Bump by hand when this module or builder.py changes what goes into an image: the
cache key holds no Python bytes (comments would rebuild images; two checkouts would
disagree), so the build logic counts only through this number."""
IMAGE_TOOL_FIELDS: Final = ("name", "binary", "version_args", "install")
VERSION_CHECKS: Final = (("tmux", "-V"), ("git", "--version"), ("node", "--version"),
                         ("gh", "--version"), ("docker", "--version"))
"""What every coi image answers, besides its tools' own checks."""
"""What of a tool definition the image build uses; the rest matters only at run time."""


@dataclass(frozen=True)
class Plan:
    """Everything a build needs, decided before any container exists."""

    alias: str
    base: base_mod.Base
    mirror: str
    recipe: str
    certificates: tuple[Path, ...]
    selected_tools: tuple[tools.Tool, ...]
    settings: config.Config
    custom_script: Path | None = None


# -- coi build ------------------------------------------------------------------------


def build_coi(base_spec: str | None, *, force: bool, as_json: bool) -> int:
    """Build the `coi` image (defaults.image), or say it is up to date."""
    if base_spec is not None:
        base_mod.parse(base_spec)  # a malformed --base is refused before Incus is asked
    settings = config.load(os.getcwd())
    client = incus.connect(settings)
    alias = naming.validate_image_name(settings.get("defaults.image"))
    current = client.image_by_alias(alias)
    spec = base_spec or settings.get("image.base") or _recorded_base(current)
    plan = _coi_plan(client, settings, alias, spec) if spec else None
    if plan and not force and _recipe_of(current) == plan.recipe:
        return _report(client, alias, plan.recipe, rebuilt=False, as_json=as_json)
    if plan is None:
        plan = _coi_plan(client, settings, alias, base_mod.auto_spec(client))
    steps = _coi_steps(plan)
    progress = Progress("coi build", len(steps) + 3)
    log_path = _log_path(settings, alias)
    progress.say(f"building {alias} from {plan.base.spec}; log: {log_path}")
    _run_build(client, plan, steps, progress, log_path)
    return _report(client, alias, plan.recipe, rebuilt=True, as_json=as_json)


def _recorded_base(image: dict[str, Any] | None) -> str:
    return str((image or {}).get("properties", {}).get("coi.base", ""))


def _recipe_of(image: dict[str, Any] | None) -> str | None:
    return (image or {}).get("properties", {}).get("coi.recipe_hash")


def _coi_plan(client: incus.Incus, settings: config.Config, alias: str, spec: str) -> Plan:
    base = base_mod.parse(spec)
    mirror = base_mod.mirror_for(base, settings.get("image.mirror"))
    registry = tools.registry_from_config(settings)
    names = settings.get("image.tools") or [settings.get("tool.name")]
    selected = tuple(tools.get_tool(name, registry) for name in names)
    certificates = ca_certificates(settings)
    recipe = coi_recipe(base_mod.identity(client, base, mirror), selected, certificates)
    return Plan(alias, base, mirror, recipe, certificates, selected, settings)


def coi_recipe(base_identity: str, selected: Sequence[tools.Tool],
               certificates: Sequence[Path]) -> str:
    """The cache key of the coi image: recipe_hash() over what the image gets of each
    tool (install, binary and version check; not where the definition lives)."""
    image_tools = [{key: tool.to_dict()[key] for key in IMAGE_TOOL_FIELDS} for tool in selected]
    return recipe_hash("coi", base_identity, certificates,
                       json.dumps(image_tools, sort_keys=True).encode())


def custom_recipe(script: Path, base_identity: str, certificates: Sequence[Path]) -> str:
    """The cache key of a custom image: recipe_hash() over the script's content."""
    return recipe_hash("custom", base_identity, certificates, script.read_bytes())


def recipe_hash(kind: str, base_identity: str, certificates: Sequence[Path],
                content: bytes) -> str:
    """sha256 over RECIPE_VERSION, build-coi.sh (every build runs its CA step), the
    base, the CA certificates' contents and `content`: contents only, no paths, so
    two checkouts of one version agree that an image is up to date."""
    return _hash([f"{kind} {RECIPE_VERSION}".encode(), RECIPE.read_bytes(),
                  base_identity.encode(), _hash([c.read_bytes() for c in certificates]).encode(),
                  content])


def _hash(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def ca_certificates(settings: config.Config) -> tuple[Path, ...]:
    """The host's locally added CAs (unless turned off) and [image] extra_ca_certificates.

    Each extra one is resolved and refused when it lies in a credential store or a
    secret system path (naming.check_secret_path), whatever config named it, and must
    be a PEM certificate holding no private key: it ends up world-readable in the
    image's CA bundle.
    """
    found: list[Path] = []
    if settings.get("image.host_ca_certificates") and HOST_CA_DIR.is_dir():
        found += sorted(p for p in HOST_CA_DIR.rglob("*.crt") if p.is_file())
    key = f"{settings.source('image.extra_ca_certificates')}: image.extra_ca_certificates"
    for entry in settings.get("image.extra_ca_certificates"):
        real = naming.check_secret_path(config.expand_path(entry), key, os.path.expanduser("~"),
                                        hint="copy the certificate to a file of its own")
        found.append(_certificate(Path(real), key))
    return tuple(found)


def _certificate(path: Path, key: str) -> Path:
    """`path` when it is a readable PEM certificate without a private key in it."""
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: cannot read {path}")
    with path.open("rb") as handle:
        text = handle.read(MAX_CERTIFICATE_BYTES + 1)
    if len(text) > MAX_CERTIFICATE_BYTES or PEM_CERTIFICATE not in text:
        raise ConfigError(f"{key}: {path} is not a PEM certificate",
                          hint="update-ca-certificates takes PEM files (BEGIN CERTIFICATE)")
    if PEM_PRIVATE_KEY in text:
        raise ConfigError(f"{key}: {path} holds a private key, which would be readable by "
                          "anyone in the image", hint="keep only the certificate in the file")
    return path


Step = tuple[str, Callable[[Builder], None]]


def _coi_steps(plan: Plan) -> list[Step]:
    """The recipe's steps in order; each runs one function of build-coi.sh."""
    steps: list[Step] = [
        ("system packages (tmux, git, build tools, python3, jq)",
         lambda b: b.step("packages")),
        ("user code (uid 1000, passwordless sudo)", lambda b: b.step("user")),
        ("Node.js and npm", lambda b: b.step("node")),
        ("GitHub CLI", lambda b: b.step("gh")),
        ("Docker engine", lambda b: b.step("docker")),
    ]
    for tool in plan.selected_tools:
        steps.append((f"AI tool {tool.name} ({tool.install.method})", _installer(tool)))
    steps.append(("check the tools answer as code", lambda b: _check_versions(b, plan)))
    steps.append(("clean up", lambda b: b.step("finish")))
    return steps


def _installer(tool: tools.Tool) -> Callable[[Builder], None]:
    method, install = tool.install.method, tool.install
    if method == "npm":
        return lambda b: b.step("tool_npm", install.package)
    if method == "pip":
        return lambda b: b.step("tool_pip", install.package)
    if method == "script":
        return lambda b: b.step("tool_script", install.script)
    return lambda _: None


def _check_versions(builder_box: Builder, plan: Plan) -> None:
    """Every program of the image answers its version check, as the tool user, in one
    exec; the first that does not is named in the log (and so in the error's tail)."""
    checks = [*VERSION_CHECKS, *((t.binary, *t.version_args) for t in plan.selected_tools
                                 if t.install.method != "none")]
    builder_box.run(["sudo", "-u", "code", "-H", "bash", "-lc", version_script(checks)])


def version_script(checks: Sequence[Sequence[str]]) -> str:
    """A bash script running each check in turn, stopping at the first that fails."""
    import shlex  # noqa: PLC0415

    lines = []
    for argv in checks:
        command = " ".join(argv)
        failed = shlex.quote(f"version check failed: {command}")
        lines.append(f"{command} || {{ echo {failed}; exit 1; }}")
    return "\n".join(lines)


def _run_build(client: incus.Incus, plan: Plan, steps: list[Step], progress: Progress,
               log_path: str) -> None:
    prefix = naming.container_prefix()
    profile = plan.settings.get("incus.profile")
    with progress.step(f"base {plan.base.spec}") as outcome:
        base_alias = base_mod.ensure(client, plan.base, plan.mirror, log_path=log_path,
                                     progress=progress, tmp_prefix=prefix)
        outcome.append(base_alias)
    with builder(client, base_alias, profile, prefix, log_path) as box:
        with progress.step("builder: network, DNS, CA certificates") as outcome:
            outcome.append(_prepare_builder(box, plan))
        for label, run_step in steps:
            with progress.step(label):
                run_step(box)
        with progress.step(f"publish as {plan.alias}"):
            box.publish(plan.alias, _properties(plan), prefix)


def _prepare_builder(box: Builder, plan: Plan) -> str:
    address = box.wait_for_network()
    box.push_script(RECIPE, SCRIPT_IN_BUILDER)
    mirror_host = plan.mirror.split("/")[2] if "://" in plan.mirror else "deb.debian.org"
    notes = [address]
    # A custom script may need no network at all; only coi's own recipe downloads.
    if plan.custom_script is None and box.ensure_dns(mirror_host):
        notes.append("DNS did not resolve: wrote static resolvers into the image")
    if plan.certificates:
        box.push_ca_certificates(plan.certificates)
        notes.append(f"{len(plan.certificates)} host CA certificate(s)")
    box.step("ca_certificates")
    return ", ".join(notes)


def _properties(plan: Plan) -> dict[str, str]:
    common = {"coi.recipe_hash": plan.recipe, "coi.version": __version__,
              "coi.base": plan.base.spec, "coi.built_at": _now()}
    if plan.custom_script is not None:
        return {**common, "description": f"custom image from {plan.custom_script.name} on "
                                         f"{plan.base.spec}",
                "coi.custom_script": str(plan.custom_script)}
    names = ",".join(t.name for t in plan.selected_tools)
    return {**common, "description": f"coi image ({plan.base.spec}; {names})",
            "coi.tools": names}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _log_path(settings: config.Config, alias: str) -> str:
    folder = Path(settings.path("paths.logs_dir"))
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"build-{alias}-{time.strftime('%Y%m%d-%H%M%S')}.log")


def _report(client: incus.Incus, alias: str, recipe: str, *, rebuilt: bool,
            as_json: bool) -> int:
    image = client.image_by_alias(alias) or {}
    size = int(image.get("size", 0))
    if as_json:
        write_record(make_record(
            "image", alias=alias, fingerprint=image.get("fingerprint", ""), size=size,
            created_at=image.get("created_at", ""), recipe_hash=recipe, rebuilt=rebuilt,
            properties={k: v for k, v in image.get("properties", {}).items()
                        if k.startswith("coi.")}))
    elif rebuilt:
        print(f"built {alias} ({image.get('fingerprint', '')[:12]}, {size / 2**20:.0f} MiB)")
    else:
        print(f"{alias} is up to date ({image.get('fingerprint', '')[:12]}); "
              "--force rebuilds it")
    return 0


# -- coi build custom -------------------------------------------------------------------


def build_custom(name: str, script: str, base_spec: str | None, *, force: bool,
                 as_json: bool) -> int:
    """Run the user's script as root in a builder from the base; publish it as `name`."""
    alias = naming.validate_image_name(name)
    script_path = _readable_script(script)
    settings = config.load(os.getcwd())
    client = incus.connect(settings)
    base = base_mod.parse(settings.get("defaults.image") if base_spec is None else base_spec)
    if base.kind == "local" and client.image_by_alias(base.alias) is None:
        raise NotFound(f"base image {base.alias!r} does not exist",
                       hint="run 'coi build' first, or pass --base")
    mirror = base_mod.mirror_for(base, settings.get("image.mirror"))
    certificates = ca_certificates(settings)
    recipe = custom_recipe(script_path, base_mod.identity(client, base, mirror), certificates)
    if not force and _recipe_of(client.image_by_alias(alias)) == recipe:
        return _report(client, alias, recipe, rebuilt=False, as_json=as_json)
    plan = Plan(alias, base, mirror, recipe, certificates, (), settings, script_path)
    log_path = _log_path(settings, alias)
    progress = Progress("coi build", 4)
    progress.say(f"building {alias} from {base.spec} with {script_path}; log: {log_path}")
    steps: list[Step] = [(f"run {script_path.name} as root", _custom_runner(script_path))]
    _run_build(client, plan, steps, progress, log_path)
    return _report(client, alias, recipe, rebuilt=True, as_json=as_json)


def _readable_script(script: str) -> Path:
    """The script must be a readable file: checked before any container is made."""
    path = Path(script).expanduser()
    if not path.exists():
        raise NotFound(f"build script {script} does not exist")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise BadInput(f"build script {script} is not a readable file")
    return path.resolve()


def _custom_runner(script_path: Path) -> Callable[[Builder], None]:
    def run_script(box: Builder) -> None:
        box.push_script(script_path, CUSTOM_SCRIPT_IN_BUILDER)
        box.run(["bash", CUSTOM_SCRIPT_IN_BUILDER])
    return run_script
