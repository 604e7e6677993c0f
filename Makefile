# coi: everyday targets. `make test` is the one command that runs every test
# (CI runs it through .ci/run); `make shell` sets a fresh machine up and starts
# a session in the current directory.
# The venv is made from the system interpreter when it is new enough: one
# under /root/.pyenv (as on these machines) cannot be run by other users, and
# coi must work for every member of incus-admin.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' \
            2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv setup test-deps test-image test lint shell shell-workspace build sweep clean bench docs man

all: venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "coi needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# Byte-compile now: with PYTHONDONTWRITEBYTECODE set (as on these machines) every
	@# start would otherwise recompile coi's modules, ~15 ms per command.
	$(PY) -m compileall -q lib coi-* >/dev/null
	touch $@

setup: venv
	$(SUDO) bin/coi setup

test-deps: venv
	$(SUDO) tests/prepare

test-image: setup test-deps
	$(SUDO) $(PY) tests/image/build.py

sweep: venv
	$(SUDO) $(PY) tests/sweep.py

lint: venv
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

# The suite runs as root (through sudo for a developer who is not): it creates
# test users, network namespaces and nftables tables; the tests of sessions run
# as a non-root test user it makes.
test: test-image
	$(PY) -m compileall -q lib coi-* >/dev/null
	$(SUDO) $(PY) tests/run_all.py

build: setup
	bin/coi build

# The project: WORKSPACE=DIR, else the directory make was started from (`make -C ~/coi
# shell` in ~/project: PWD is the caller's, CURDIR the checkout's). The checkout itself
# is refused: the agent would be given coi's own code.
WORKSPACE ?= $(PWD)
shell: shell-workspace build
	bin/coi shell --workspace '$(WORKSPACE)'

shell-workspace:
	@if [ "$$(realpath '$(WORKSPACE)')" = "$$(realpath '$(CURDIR)')" ]; then \
	  echo "make shell: name your project: make -C $(CURDIR) shell from it, or WORKSPACE=DIR" >&2; \
	  exit 2; fi

clean:
	rm -rf $(VENV) build *.egg-info tests/.results

docs: venv
	$(PY) docs/generate.py

# The manual pages (man/*.1) are made with the docs, from the same usage text.
man: docs

bench: venv
	$(PY) -m compileall -q lib coi-* >/dev/null
	$(SUDO) $(PY) -m bench $(if $(BASELINE),--baseline $(BASELINE))

# Installs coi for the user running make (no root): a venv under
# ~/.local/share/coi and links in ~/.local/bin (see install.sh).
.PHONY: install-user
install-user:
	./install.sh
