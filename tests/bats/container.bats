#!/usr/bin/env bats
# `coi container ...` and `coi file ...` as a user meets them when something is wrong:
# exit codes, one-line errors, silence where promised. Nothing here creates a container.

setup() {
  load helpers
  isolate_config
  MISSING=coi-test-nonexistent-zz
  printf 'data' >"$BATS_TEST_TMPDIR/file"
  mkdir -p "$BATS_TEST_TMPDIR/dir"
}

@test "coi container exists of a missing container exits 1 and prints nothing" {
  run --separate-stderr coi container exists "$MISSING"
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" ""
}

@test "coi container running of a missing container exits 1 and prints nothing" {
  run --separate-stderr coi container running "$MISSING"
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" ""
}

@test "coi container exists with the daemon unreachable exits 4 in one line" {
  INCUS_SOCKET=$BATS_TEST_TMPDIR/no.socket run coi container exists "$MISSING"
  assert_failure 4
  assert_equal "${#lines[@]}" 1
  assert_output --partial "coi container: Incus is not running"
}

@test "coi container start|stop|delete of a missing container exits 3 in one line" {
  for verb in start stop delete; do
    run coi container "$verb" "$MISSING"
    assert_failure 3
    assert_equal "${#lines[@]}" 1
    assert_output "coi container: container $MISSING does not exist (see 'coi list' or 'incus list')"
  done
}

@test "coi container exec of a missing container exits 3 in one line" {
  run coi container exec "$MISSING" -- true
  assert_failure 3
  assert_equal "${#lines[@]}" 1
  assert_output --partial "container $MISSING does not exist"
}

@test "coi container exec --capture of a missing container prints an error record" {
  run --separate-stderr coi container exec "$MISSING" --capture -- true
  assert_failure 3
  run json_get "d['kind'], d['code'], d['exit_code']"
  assert_output "error not_found 3"
}

@test "coi container exec --format without --capture is refused with exit 2" {
  run coi container exec "$MISSING" --format raw -- pwd
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "coi container: --format only applies with --capture"
}

@test "coi container exec --capture --format yaml is refused with exit 2" {
  run coi container exec "$MISSING" --capture --format yaml -- pwd
  assert_failure 2
  assert_output "coi container: unknown format 'yaml'; use json or raw"
}

@test "coi container exec without -- before the command is refused with exit 2" {
  run coi container exec "$MISSING" ls -la
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "coi container exec: needs '--' before the command"
}

@test "coi container exec --env without KEY=VALUE is refused with exit 2" {
  run coi container exec "$MISSING" --env NOVALUE -- true
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "--env 'NOVALUE' is not KEY=VALUE"
}

@test "coi container exec --user that is not a number is refused with exit 2" {
  run coi container exec "$MISSING" --user code -- true
  assert_failure 2
  assert_output --partial "--user 'code' is not a numeric id"
}

@test "coi container commands with missing arguments say what is missing, with the usage" {
  run coi container launch coi-test-image
  assert_failure 2
  assert_equal "${#lines[@]}" 2
  assert_line --index 0 "coi container launch: missing <name>"
  assert_line --index 1 "usage: coi container launch <image> <name> [--ephemeral] [--debug]"
  run coi container mount "$MISSING" dev
  assert_failure 2
  assert_line --index 0 "coi container mount: missing <source> and <path>"
  run coi container start
  assert_failure 2
  assert_line --index 0 "coi container start: missing <name>"
  run coi container exec
  assert_failure 2
  assert_output --partial "needs '--' before the command"
}

@test "coi container with an unknown command names it and the commands there are" {
  run coi container frobnicate x
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output "coi container: unknown command 'frobnicate'; one of: launch, start, stop, delete, exec, exists, running, mount (see 'coi container --help')"
}

@test "coi file push with one argument says the destination is missing" {
  run coi file push "$BATS_TEST_TMPDIR/file"
  assert_failure 2
  assert_line --index 0 "coi file push: missing <name:path>"
  assert_line --index 1 --partial "usage: coi file push [-r] [--uid N] [--gid N] [--mode MODE]"
}

@test "coi file push with an owner or mode that is not a number exits 2 in one line" {
  for args in "--uid code" "--gid -1" "--uid 4294967295" "--mode 999" "--mode rw"; do
    run coi file push $args "$BATS_TEST_TMPDIR/file" "$MISSING:/tmp/x"
    assert_failure 2
    assert_equal "${#lines[@]}" 1
    assert_output --regexp "^coi file: --(uid|gid|mode) '[^']*': expected "
  done
}

@test "coi container launch with an invalid container name exits 2" {
  run coi container launch coi-test-image 'bad_name!'
  assert_failure 2
  assert_output --partial "container name 'bad_name!' contains the character '_'"
}

@test "coi file push to a target without NAME: exits 2" {
  run coi file push "$BATS_TEST_TMPDIR/file" /tmp/x
  assert_failure 2
  assert_output "coi file: destination '/tmp/x' is not NAME:PATH (e.g. my-container:/workspace/file)"
}

@test "coi file push to an empty container name exits 2" {
  run coi file push "$BATS_TEST_TMPDIR/file" :/tmp/x
  assert_failure 2
  assert_output --partial "has no container name before ':'"
}

@test "coi file pull from a relative container path exits 2" {
  run coi file pull "$MISSING:etc/hostname" "$BATS_TEST_TMPDIR/out"
  assert_failure 2
  assert_output --partial "the path in the container must be absolute"
}

@test "coi file push of a directory without -r exits 2 in one line" {
  run coi file push "$BATS_TEST_TMPDIR/dir" "$MISSING:/tmp/"
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "is a directory (use -r to copy a directory)"
}

@test "coi file push of a missing host file exits 3" {
  run coi file push "$BATS_TEST_TMPDIR/nope" "$MISSING:/tmp/"
  assert_failure 3
  assert_output --partial "host path '$BATS_TEST_TMPDIR/nope' does not exist"
}

@test "coi file push and pull with a missing container exit 3" {
  run coi file push "$BATS_TEST_TMPDIR/file" "$MISSING:/tmp/x"
  assert_failure 3
  assert_output --partial "container $MISSING does not exist"
  run coi file pull "$MISSING:/etc/hostname" "$BATS_TEST_TMPDIR/out"
  assert_failure 3
  assert_output --partial "container $MISSING does not exist"
  [ ! -e "$BATS_TEST_TMPDIR/out" ]
}
