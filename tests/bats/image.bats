#!/usr/bin/env bats
# `coi image ...` as a user meets it: exit codes, one-line errors, JSON that parses.
# Nothing here creates an image or a container.

setup() {
  load helpers
  isolate_config
}

@test "coi image exists of a missing alias exits 1 and prints nothing" {
  run --separate-stderr coi image exists coi-test-nonexistent-zz
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" ""
}

@test "coi image exists of an invalid name exits 1 and prints nothing" {
  run --separate-stderr coi image exists 'no/such..name'
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" ""
}

@test "coi image list --format json is one image_list document of image records" {
  run --separate-stderr coi image list --all --format json
  assert_success
  assert_equal "$stderr" ""
  run "$PY" -c '
import sys
from coi_common.protocol import parse_record, validate
[line] = sys.stdin.read().splitlines()
images = parse_record(line, "image_list")["images"]
for record in images:
    assert len(validate(record, "image")["fingerprint"]) == 64, record
print(len(images) > 0)' <<<"$output"
  assert_success
  assert_output "True"
}

@test "coi image list --format yaml is refused in one line with exit 2" {
  run coi image list --format yaml
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output "coi image: unknown format 'yaml'; use text or json"
}

@test "coi image cleanup with --keep 0 is refused in one line with exit 2" {
  run coi image cleanup x --keep 0
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "--keep must be a whole number 1 or more"
}

@test "coi image cleanup with a blank prefix is refused in one line with exit 2" {
  run coi image cleanup ' ' --keep 1
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "non-empty alias prefix"
}

@test "coi image delete of a missing alias exits 3 in one line" {
  run coi image delete coi-test-nonexistent-zz
  assert_failure 3
  assert_equal "${#lines[@]}" 1
  assert_output "coi image: image coi-test-nonexistent-zz does not exist (see 'coi image list --all')"
}

@test "coi image publish of a missing container exits 3 in one line" {
  run coi image publish coi-test-nonexistent-zz coi-test-x
  assert_failure 3
  assert_equal "${#lines[@]}" 1
  assert_output --partial "container coi-test-nonexistent-zz does not exist"
}

@test "coi image publish failing with --format json still prints an error record" {
  run --separate-stderr coi image publish coi-test-nonexistent-zz coi-test-x --format json
  assert_failure 3
  run json_get "d['kind'], d['code']"
  assert_output "error not_found"
}
