#!/bin/sh
# install.sh: install coi for the user who runs it. No root needed.
#
# Makes a virtualenv under ${XDG_DATA_HOME:-~/.local/share}/coi/venv, installs
# the checkout this script is in (not editable: the checkout may move or go
# away afterwards) and links every coi executable into ~/.local/bin. A venv is
# not "externally managed" (PEP 668), so this works where `pip install --user`
# is refused. Running it again upgrades in place.
#
# ./install.sh --uninstall removes what it made for this user: the links in
# ~/.local/bin and ~/.local/share/man that point into the venv, and the venv.
# Saved sessions (~/.coi) stay; root's part is `sudo coi setup --uninstall`.
#
# PYTHON=/path/to/python3 picks the interpreter (3.11 or newer, with venv).
# Otherwise /usr/bin/python3 comes first: an interpreter under another
# user's home (pyenv under /root) is one that other users cannot run.
set -eu

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

: "${HOME:?install.sh needs HOME}"
SRC=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
VENV=${XDG_DATA_HOME:-$HOME/.local/share}/coi/venv
BIN=$HOME/.local/bin
# man finds pages beside each PATH directory: ~/.local/bin -> ~/.local/share/man.
MAN=$HOME/.local/share/man/man1

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
has_venv() { "$1" -c 'import ensurepip, venv' >/dev/null 2>&1; }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        new_enough "$PYTHON" || die "PYTHON=$PYTHON is not Python 3.11 or newer; coi needs 3.11+"
        found=$PYTHON
    else
        found=
        for candidate in /usr/bin/python3 python3.13 python3.12 python3.11 python3; do
            path=$(command -v "$candidate" 2>/dev/null) || continue
            if new_enough "$path"; then found=$path; break; fi
        done
        [ -n "$found" ] || die "coi needs Python 3.11 or newer, and none was found; ask root to" \
            "install it (Debian, Ubuntu: apt-get install python3 python3-venv), or set PYTHON"
    fi
    has_venv "$found" || die "$found cannot make virtualenvs; ask root to run:" \
        "apt-get install python3-venv (or set PYTHON to another Python 3.11+)"
    printf '%s\n' "$found"
}

in_group() { id -nG ${1:+"$1"} | tr ' ' '\n' | grep -qx incus-admin; }

# Warnings only: the install itself needs neither Incus nor the group.
check_incus() {
    [ "$(id -u)" = 0 ] && return 0
    command -v incus >/dev/null 2>&1 ||
        warn "Incus is not installed yet: ask root to run: $BIN/coi setup"
    user=$(id -un)
    if in_group; then
        return 0
    elif in_group "$user"; then
        warn "$user joined incus-admin after this login started: log in again"
    else
        warn "$user is not in the incus-admin group: ask root to run:" \
            "usermod -aG incus-admin $user, then log in again"
    fi
}

install_venv() {
    "$1" -m venv "$VENV" || die "could not make the virtualenv $VENV"
    # pip builds a local project inside it, and setuptools' build/ directory
    # keeps modules deleted since the last build, which an upgrade would then
    # install again. A clean copy avoids that and leaves the checkout untouched
    # (it may even be read-only).
    stage=$(mktemp -d "${TMPDIR:-/tmp}/coi-install.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    trap 'exit 130' INT TERM
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./tests/.results -cf - . | tar -C "$stage" -xf -
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$stage" ||
        die "pip could not install coi into $VENV (see above)"
    # pip compiles what it installs unless configured not to (no-compile), and
    # with PYTHONDONTWRITEBYTECODE set nothing writes them later: every command
    # would then compile coi's modules again at start (~15 ms).
    "$VENV/bin/python" -m compileall -q "$("$VENV/bin/python" -c \
        'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null
}

# Every console script of the installed distribution (pyproject's
# [project.scripts]): the dispatcher finds its siblings next to the `coi` it
# was started as, so they all go into the same directory.
link_executables() {
    mkdir -p "$BIN"
    names=$("$VENV/bin/python" -c 'from importlib.metadata import distribution
print(" ".join(e.name for e in distribution("coi").entry_points if e.group == "console_scripts"))')
    for name in $names; do
        if [ -e "$BIN/$name" ] && [ ! -L "$BIN/$name" ]; then
            warn "$BIN/$name exists and is not a link: left alone"
            continue
        fi
        ln -sfn "$VENV/bin/$name" "$BIN/$name"
    done
    for link in "$BIN"/coi "$BIN"/coi-*; do  # executables a newer coi no longer has
        if [ -L "$link" ] && [ ! -e "$link" ]; then
            case $(readlink "$link") in "$VENV/bin/"*) rm -f "$link" ;; esac
        fi
    done
}

# The manual pages the distribution installed into the venv (man/*.1): `man coi`,
# `man coi-shell`, ... for the user, without root.
link_manuals() {
    pages=$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')/share/man/man1
    [ -d "$pages" ] || { warn "no manual pages in $pages"; return 0; }
    mkdir -p "$MAN"
    for page in "$pages"/coi*.1; do
        ln -sfn "$page" "$MAN/${page##*/}"
    done
    for link in "$MAN"/coi*.1; do  # pages a newer coi no longer has
        if [ -L "$link" ] && [ ! -e "$link" ]; then
            case $(readlink "$link") in "$VENV/"*) rm -f "$link" ;; esac
        fi
    done
}

report_path() {
    case ":$PATH:" in
        *":$BIN:"*)
            found=$(command -v coi || true)
            if [ "$found" = "$BIN/coi" ]; then
                say "$BIN is on your PATH."
            else
                warn "$BIN is on your PATH, but 'coi' runs $found, which comes first"
            fi ;;
        *)
            say "$BIN is not on your PATH. Log in again (Debian's and Ubuntu's ~/.profile"
            say "add it once it exists), or add this line to ~/.profile:"
            say "  export PATH=\"\$HOME/.local/bin:\$PATH\"" ;;
    esac
}

next_steps() {
    say ""
    say "Next steps:"
    if [ "$(id -u)" = 0 ]; then
        say "  1. $BIN/coi setup        # once per machine: Incus and coi's host service"
    else
        say "  1. once per machine, root sets up Incus and coi's host service:"
        say "       sudo $BIN/coi setup"
        say "     or, without sudo:  su -c '$BIN/coi setup'"
        in_group "$(id -un)" ||
            say "     and adds you to incus-admin: usermod -aG incus-admin $(id -un) (log in again)"
    fi
    say "  2. coi doctor                       # checks everything, with a fix for each problem"
    say "  3. cd ~/project && coi shell"
}

# Only links that point into our venv go: a file or another tool's link stays.
uninstall() {
    removed=0
    for link in "$BIN"/coi "$BIN"/coi-* "$MAN"/coi*.1; do
        [ -L "$link" ] || continue
        case $(readlink "$link") in
            "$VENV/"*) rm -f "$link"; removed=$((removed + 1)) ;;
        esac
    done
    if [ -d "$VENV" ]; then
        rm -rf "$VENV"
        rmdir "${VENV%/venv}" 2>/dev/null || true
        say "removed $VENV and $removed link(s) into it"
    else
        say "coi is not installed for $(id -un) ($VENV does not exist); removed $removed link(s)"
    fi
    say "Saved sessions in ~/.coi stay (remove that folder yourself if you want them gone)."
    say "Root removes the host part with: sudo coi setup --uninstall (before this, or with"
    say "a coi of its own)."
}

case ${1:-} in
    --uninstall) uninstall; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (use: ./install.sh, or ./install.sh --uninstall)" ;;
esac

[ "$(uname -s)" = Linux ] || die "coi runs on Linux only (Incus containers); this is $(uname -s)"
python=$(pick_python)
check_incus
say "installing coi from $SRC into $VENV (with $python)"
install_venv "$python"
link_executables
link_manuals
"$BIN/coi" help >/dev/null || die "the installed $BIN/coi does not run (see above)"
say "installed: $("$BIN/coi" --version | head -n 1), linked into $BIN"
report_path
next_steps
