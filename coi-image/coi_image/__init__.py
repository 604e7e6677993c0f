"""coi-image: build the images coi sessions run in, and manage local images.

Usage:
  coi-image build [--base BASE] [--force] [--dry-run] [--format FMT] [--debug]
  coi-image build custom <name> --script PATH [--base IMAGE] [--force] [--dry-run]
                         [--format FMT] [--debug]
  coi-image image list [--all] [--prefix P] [--format FMT] [--debug]
  coi-image image exists <name> [--debug]
  coi-image image publish <container> <name> [--description TEXT] [--dry-run]
                          [--format FMT] [--debug]
  coi-image image delete <name> [--dry-run] [--debug]
  coi-image image cleanup <prefix> --keep N [--dry-run] [--format FMT] [--debug]
  coi-image (-h | --help)
  coi-image --version

Commands:
  build           Build the image `coi` (defaults.image) that sessions use: the
                  base, then tmux, git, Node.js, gh, Docker and the configured AI
                  tools, run as user `code` (uid 1000). Prints "up to date" when
                  nothing changed since the last build.
  build custom    Run your script as root in a builder made from --base
                  (default: coi) and publish the result as <name>.
  image list      coi's images (--all: every local image).
  image exists    Exit 0 when the image exists, 1 when not; prints nothing.
  image publish   Publish a stopped container as an image.
  image delete    Delete an image by alias, or by fingerprint (at least its first 12
                  hex digits, as `image list` shows them): also one without alias.
  image cleanup   Keep the newest N images whose alias starts with <prefix>,
                  delete the older ones.

Options:
  --base BASE         Base of the build: an image alias, `images:DISTRO/RELEASE`
                      (needs the images: remote), or `bootstrap:DISTRO/SUITE`
                      (made offline with debootstrap, e.g. bootstrap:debian/bookworm).
                      Default: [image] base, else images:ubuntu/24.04 when that
                      remote answers, else bootstrap:debian/bookworm.
  --script PATH       Shell script run as root inside the builder.
  --force             Rebuild even when the image is up to date.
  --all               List every local image, not only coi's.
  --prefix P          Only images whose alias starts with P.
  --description TEXT  Description of the published image.
  --keep N            How many of the newest images to keep (1 or more).
  --dry-run           Change nothing: print the plan, every change the command
                      would make (Incus REST calls, execs, `incus` calls),
                      assuming each succeeds; reads are made.
  --format FMT        Output format: text or json [default: text].
  --debug             Show tracebacks on errors.
  -h --help           Show this help.

Examples:
  coi build
  coi build custom my-rust --script build-rust.sh
  coi image list --format json
  coi image cleanup nightly- --keep 3
  coi image exists my-rust && echo built
  coi image publish my-container my-snapshot --description "before the upgrade"
  coi image delete my-snapshot
"""

from __future__ import annotations

from coi_common import output
from coi_common.entry import Args, run_main


def main(argv: list[str] | None = None) -> None:
    """Entry point of coi-image."""
    run_main("coi-image", __doc__ or "", dispatch, argv)


def dispatch(args: Args) -> int:
    """Run the chosen command; each returns the exit status."""
    as_json = output.wants_json(args)
    if args["build"]:
        from coi_image import build  # noqa: PLC0415

        if args["custom"]:
            return build.build_custom(args["<name>"], args["--script"], args["--base"],
                                      force=args["--force"], as_json=as_json)
        return build.build_coi(args["--base"], force=args["--force"], as_json=as_json)
    from coi_image import manage  # noqa: PLC0415

    return manage.run(args, as_json=as_json)
