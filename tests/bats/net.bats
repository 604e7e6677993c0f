#!/usr/bin/env bats
# `coi-net` / `coi network` as a user meets it: help, usage errors, refusals,
# exit codes, JSON that parses. Nothing here creates a container; every
# command uses a test-only nft table (coi_test_bats<hex>) and state dir, and
# none of them has anything to put in that table.

setup() {
  load helpers
  isolate_config
  export COI_NFT_TABLE="coi_test_bats$(printf '%04x' $((RANDOM)))"
  export COI_NET_STATE_DIR=$BATS_TEST_TMPDIR/net-state
}

teardown() {
  for family in bridge inet; do
    nft delete table "$family" "$COI_NFT_TABLE" 2>/dev/null || true
  done
}

@test "coi-net --help shows every command and exits 0" {
  run coi-net --help
  assert_success
  for command in apply remove refresh status gc; do
    assert_line --partial "coi-net [network] $command"
  done
  assert_output --partial "coi-net refresh --all"
}

@test "coi network --help lists the network commands, and coi-net --help is its own page" {
  run coi network --help
  assert_success
  assert_line --index 0 "coi network: Show and manage egress rules of containers."
  assert_line --regexp "^  status  "
  run coi-net --help
  assert_success
  assert_line --index 0 "coi-net: egress rules (nftables) of coi's containers."
}

@test "coi-net network status and coi-net status are the same command" {
  run --separate-stderr coi-net network status --format json
  assert_success
  assert_output '{"coi": 1, "kind": "net_status_list", "containers": []}'
  assert_equal "$stderr" ""
  run --separate-stderr coi network status
  assert_success
  assert_output ""
}

@test "an unknown mode is refused in one line with exit 2" {
  run --separate-stderr coi-net apply coi-test-nosuch-1 --mode wide
  assert_failure 2
  assert_equal "$stderr" "coi-net: network mode 'wide' is not one of restricted, allowlist, open"
}

@test "a container name that is not a name is refused with exit 2" {
  run --separate-stderr coi-net remove 'coi-x;reboot'
  assert_failure 2
  assert_output ""
  [[ "$stderr" == *"contains the character ';'"* ]]
}

@test "a private address in the allowlist is refused with exit 2" {
  run --separate-stderr coi-net apply coi-test-nosuch-1 --mode allowlist --allow 10.1.2.3
  assert_failure 2
  [[ "$stderr" == *"10.1.2.3 is in a private, link-local or reserved range"* ]]
}

@test "a wildcard over a top-level domain is refused with exit 2" {
  run --separate-stderr coi-net apply coi-test-nosuch-1 --mode allowlist --allow '*.com'
  assert_failure 2
  [[ "$stderr" == *"allowed wildcard '*.com' is not '*.' and a domain of two or more labels"* ]]
}

@test "a table name that is not coi's is refused before anything runs" {
  COI_NFT_TABLE=filter run --separate-stderr coi-net gc
  assert_failure 2
  [[ "$stderr" == *"COI_NFT_TABLE 'filter' is not a coi table name"* ]]
}

@test "status of a container without rules exits 3 with one JSON error record" {
  run --separate-stderr coi-net status coi-test-nosuch-1 --format json
  assert_failure 3
  run json_get "(d['kind'], d['code'], d['exit_code'])"
  assert_output "('error', 'not_found', 3)"
  assert_equal "$stderr" "coi-net: coi has no network rules for container coi-test-nosuch-1 (coi network apply coi-test-nosuch-1)"
}

@test "remove of a container without rules succeeds and says so" {
  run --separate-stderr coi-net remove coi-test-nosuch-1
  assert_success
  assert_output --regexp '^coi-test-nosuch-1: had no rules \(coi[0-9a-f]{12}\)$'
}

@test "refresh of a container without rules fails with exit 1 and a message on stderr" {
  run --separate-stderr coi-net refresh coi-test-nosuch-1
  assert_failure 1
  assert_output ""
  assert_equal "$stderr" "coi-net: coi-test-nosuch-1: no rules applied by coi"
}

@test "refresh --all and gc with nothing to do are silent and succeed (cron)" {
  run --separate-stderr coi-net refresh --all
  assert_success
  assert_output ""
  assert_equal "$stderr" ""
  run --separate-stderr coi-net gc
  assert_success
  assert_output ""
  assert_equal "$stderr" ""
}

@test "apply of a missing container exits 3, also as a dry run" {
  run --separate-stderr coi-net apply coi-test-nosuch-1 --dry-run
  assert_failure 3
  [[ "$stderr" == *"coi-test-nosuch-1"* ]]
}

@test "a user who is neither root nor a member is told to join incus-admin, exit 5" {
  for verb in apply remove; do
    run --separate-stderr setpriv --reuid 65534 --regid 65534 --clear-groups \
      env -u XDG_CONFIG_HOME -u COI_SYSTEM_CONFIG HOME=/tmp "$ROOT/bin/coi-net" "$verb" \
      coi-test-nosuch-1
    assert_failure 5
    [[ "$stderr" == *"no permission to use"*"join the incus-admin group"* ]]
  done
}

@test "refresh by a user who is not root says it needs root, exit 5" {
  run --separate-stderr setpriv --reuid 65534 --regid 65534 --clear-groups \
    env -u XDG_CONFIG_HOME -u COI_SYSTEM_CONFIG HOME=/tmp "$ROOT/bin/coi-net" refresh --all
  assert_failure 5
  [[ "$stderr" == *"needs root"* ]]
}

@test "an unknown output format is refused with exit 2" {
  run --separate-stderr coi-net status --format yaml
  assert_failure 2
  assert_equal "$stderr" "coi-net: unknown format 'yaml'; use text or json"
}
