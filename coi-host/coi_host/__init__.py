"""coi-host: prepare this machine for coi, check it, and show the configuration.

Usage:
  coi-host setup [--format FMT] [--debug]
  coi-host setup --uninstall [--sessions] [--keep-images] [--force] [--dry-run]
                 [--format FMT] [--debug]
  coi-host doctor [--format FMT] [--debug]
  coi-host config show [--workspace DIR] [--profile NAME] [--format FMT] [--debug]
  coi-host serve [--socket PATH] [--tick SECONDS] [--debug]
  coi-host view build <name> <workspace> [--protect PATH]... [--mask PATTERN]...
                [--format FMT] [--debug]
  coi-host view release <name> [--forget] [--format FMT] [--debug]
  coi-host trust [--workspace DIR] [--show | --revoke] [--format FMT] [--debug]
  coi-host (-h | --help)
  coi-host --version

Commands:
  setup        Install Incus if absent, start it, and create what coi needs
               (storage pool 'coi', bridge, profile 'coi'). Needs root.
               Idempotent: a second run changes nothing. --uninstall removes
               what setup made (coi's containers, unsaved; coi's images; the
               profile, bridge and pool when nothing else uses them; the
               nftables tables; the host service; the id-map lines coi added)
               after listing it and asking; Incus itself and saved sessions
               stay.
  doctor       Check Incus, permissions, pool, bridge, profile, image and
               host tools; print a fix for each failing check. Exit 0 only
               when every required check holds.
  config show  Print the effective configuration and where each value came from.
  trust        Let this workspace's .coi.toml widen settings (until then it may
               only tighten them: a stricter network mode, fewer processes).
               Trust pins the file's content: after any change, trust again.
  serve        Run coi's host service (root): the socket through which members
               of incus-admin get network rules applied and their id map
               delegated, without sudo. `coi setup` installs and starts it;
               see docs/host-service.md.
  view build   (plumbing, root) Build the workspace view of container <name>:
               <workspace> with every --protect path read-only and every file
               matching a --mask pattern shown empty, under /run/coi/views/.
               coi shell runs it as root; a member's view comes from the
               host service. Prints the view record.
  view release (plumbing, root) Detach that view from the host; --forget also
               removes its empty directory (the container is gone).

Options:
  --format FMT      Output format: text or json [default: text].
  --workspace DIR   Workspace whose .coi.toml applies [default: .].
  --profile NAME    Apply the [profiles.NAME] table of the configuration.
  --uninstall       setup: remove what setup made (asks first).
  --sessions        setup --uninstall: also every user's saved sessions.
  --keep-images     setup --uninstall: keep coi's images.
  --force           setup --uninstall: do not ask (needed without a terminal).
  --dry-run         setup --uninstall: list what would be removed; change nothing.
  --show            trust: say whether the file is trusted, change nothing.
  --revoke          trust: take the trust back.
  --socket PATH     serve: the socket to listen on (default: $COI_HOST_SOCKET,
                    else /run/coi/host.sock).
  --tick SECONDS    serve: how often the upkeep of egress rules runs: missing
                    rules restored, expired allowlist answers asked again;
                    every sixth time, rules of deleted containers removed
                    [default: 10].
  --protect PATH    view build: a path of the workspace to make read-only.
  --mask PATTERN    view build: a file name pattern to show empty.
  --forget          view release: also remove the view's directory.
  --debug           Show tracebacks on errors.
  -h --help         Show this help.

Examples:
  sudo coi setup
  sudo coi setup --uninstall --dry-run
  coi doctor --format json
  coi config show --profile rust
  coi trust --show
"""

from __future__ import annotations

from coi_common import output
from coi_common.entry import Args, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-host."""
    run_main("coi-host", __doc__ or "", dispatch, argv)


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    as_json = output.wants_json(args)
    if args["setup"]:
        return _setup(args, as_json=as_json)
    if args["doctor"]:
        from coi_host.doctor import run_doctor  # noqa: PLC0415

        return run_doctor(as_json=as_json)
    if args["trust"]:
        from coi_host.config_show import trust_workspace  # noqa: PLC0415

        return trust_workspace(args["--workspace"], show=args["--show"],
                               revoke=args["--revoke"], as_json=as_json)
    if args["serve"]:
        from coi_common import hostservice  # noqa: PLC0415
        from coi_host.service import serve  # noqa: PLC0415

        given = args["--socket"]  # given empty is refused, not read as the default
        return serve(hostservice.socket_path() if given is None else given,
                     tick=_tick(args["--tick"]))
    if args["view"]:
        from coi_host.views import run_view  # noqa: PLC0415

        return run_view(args, as_json=as_json)
    from coi_host.config_show import show_config  # noqa: PLC0415

    return show_config(args["--workspace"], args["--profile"], as_json=as_json)


def _setup(args: Args, *, as_json: bool) -> int:
    if args["--uninstall"]:
        from coi_host.uninstall import run_uninstall  # noqa: PLC0415

        return run_uninstall(sessions=args["--sessions"], keep_images=args["--keep-images"],
                             force=args["--force"], dry_run=args["--dry-run"],
                             as_json=as_json)
    from coi_host.setup import run_setup  # noqa: PLC0415 - setup pulls in sh and pyroute2

    return run_setup(as_json=as_json)


def _tick(text: str) -> float:
    """--tick: seconds between two rounds of the upkeep, 1 to 3600."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 1 <= seconds <= 3600:
        from coi_common.errors import UsageError  # noqa: PLC0415

        raise UsageError(f"--tick {text!r}: expected seconds from 1 to 3600")
    return seconds
