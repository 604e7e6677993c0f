#!/usr/bin/env bats
# `coi list|kill|...` (coi-slot) as a user meets it: exit codes, one-line errors, JSON
# that parses. A prefix of this test's own keeps every real container out of sight;
# nothing here creates a container.

setup() {
  load helpers
  isolate_config
  export COI_CONTAINER_PREFIX="coi-test-bats$$-"
}

@test "coi list with no coi containers prints one friendly line" {
  run --separate-stderr coi list
  assert_success
  assert_output "no coi containers"
  assert_equal "$stderr" ""
}

@test "coi list --format json with no coi containers is one record with an empty list" {
  run --separate-stderr coi list --format json
  assert_success
  assert_equal "$stderr" ""
  assert_output '{"coi": 1, "kind": "container_list", "active_containers": []}'
  run json_get "d['kind'], d['active_containers'], 'saved_sessions' in d"
  assert_output "container_list [] False"
}

@test "coi list --all --format json adds an empty list of saved sessions" {
  run --separate-stderr coi list --all --format json
  assert_success
  run json_get "d['active_containers'], d['saved_sessions']"
  assert_output "[] []"
}

@test "coi list --format yaml is refused in one line with exit 2" {
  run coi list --format yaml
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output "coi list: unknown format 'yaml'; use text or json"
}

@test "coi kill of a container that does not exist exits 3 in one line" {
  run coi kill "${COI_CONTAINER_PREFIX}0123abcd-1"
  assert_failure 3
  assert_equal "${#lines[@]}" 1
  assert_output --partial "${COI_CONTAINER_PREFIX}0123abcd-1: not a coi container"
}

@test "coi kill --all without --force and without a terminal exits 2 with a hint" {
  run coi kill --all </dev/null
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "add --force"
}

@test "coi clean without --force and without a terminal exits 2" {
  run coi clean </dev/null
  assert_failure 2
  assert_equal "${#lines[@]}" 1
}

@test "coi kill, shutdown and persist with neither names nor --all say what is missing" {
  for verb in kill shutdown persist; do
    run --separate-stderr coi "$verb"
    assert_failure 2
    assert_output ""
    assert_equal "${stderr_lines[0]}" "coi $verb: missing <name> or --all"
    [[ ${stderr_lines[1]} == "usage: coi $verb (<name>... | --all) "* ]]
  done
}

@test "coi-slot run by itself names itself in argument errors" {
  run coi-slot kill --no-save
  assert_failure 2
  assert_line --index 0 "coi-slot kill: missing <name> or --all"
}

@test "coi list with an unknown option names it under coi list" {
  run coi list --bogus
  assert_failure 2
  assert_line --index 0 "coi list: unexpected argument '--bogus'"
  assert_line --index 1 "usage: coi list [--all] [--all-users] [--format FMT] [--debug]"
}

@test "coi tmux send and capture without a name or text say what is missing" {
  run coi tmux send
  assert_failure 2
  assert_line --index 0 "coi tmux send: missing <name> and <text>"
  run coi tmux send coi-ab12cd34-1
  assert_line --index 0 "coi tmux send: missing <text>"
  run coi tmux capture
  assert_line --index 0 "coi tmux capture: missing <name>"
  run coi tmux sned
  assert_failure 2
  assert_output "coi tmux: unknown command 'sned'; one of: list, send, capture (see 'coi tmux --help')"
}

@test "coi list --all-users --format json with no coi containers is an empty list" {
  run --separate-stderr coi list --all-users --format json
  assert_success
  assert_output '{"coi": 1, "kind": "container_list", "active_containers": []}'
}

@test "coi shutdown --timeout that is not whole seconds exits 2" {
  run coi shutdown --timeout soon --all --force
  assert_failure 2
  assert_output "coi shutdown: --timeout must be a whole number of seconds, got 'soon'"
}

@test "coi-slot next prints a slot record that parses, in its workspace" {
  mkdir -p "$BATS_TEST_TMPDIR/ws"
  run --separate-stderr coi-slot next --workspace "$BATS_TEST_TMPDIR/ws"
  assert_success
  assert_equal "$stderr" ""
  run json_get "d['kind'], d['slot'], d['container'].startswith('$COI_CONTAINER_PREFIX')"
  assert_output "slot 1 True"
}

@test "coi-slot next for a missing workspace exits 3 in one line" {
  run coi-slot next --workspace "$BATS_TEST_TMPDIR/nowhere"
  assert_failure 3
  assert_equal "${#lines[@]}" 1
}
