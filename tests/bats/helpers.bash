# Shared set-up for coi's CLI tests: isolated config dirs, the checkout's bin/.
bats_require_minimum_version 1.5.0
bats_load_library bats-support
bats_load_library bats-assert

ROOT=${COI_ROOT:-$(cd "$BATS_TEST_DIRNAME/../.." && pwd)}
PY=$ROOT/.venv/bin/python

isolate_config() {
  export HOME=$BATS_TEST_TMPDIR/home
  export XDG_CONFIG_HOME=$HOME/.config
  export COI_SYSTEM_CONFIG=$BATS_TEST_TMPDIR/etc-coi/config.toml
  mkdir -p "$XDG_CONFIG_HOME/coi"
  PATH=$ROOT/bin:$PATH
}

# json_get EXPR: evaluate a Python expression on the JSON in $output (bound to `d`).
json_get() {
  printf '%s' "$output" | "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)"
}
