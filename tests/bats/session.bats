#!/usr/bin/env bats
# `coi session ...`, `coi info` and `coi-session` as a user meets them: exit codes,
# one-line errors, golden text, JSON that parses. Sessions are planted as files
# in this test's own ~/.coi; nothing here creates a container.

setup() {
  load helpers
  isolate_config
  export COI_CONTAINER_PREFIX="coi-test-bats$$-"
  WS=$BATS_TEST_TMPDIR/ws
  mkdir -p "$WS"
  WS=$(cd "$WS" && pwd -P)
  cd "$WS"
}

# plant ID UPDATED [WORKSPACE] [TOOL]: a saved session with one history line.
plant() {
  local id=$1 updated=$2 ws=${3:-$WS} tool=${4:-dummy}
  local dir=$HOME/.coi/sessions-$tool/$id
  mkdir -p "$dir/home/.dummy"
  printf 'hello\n' > "$dir/home/.dummy/history"
  printf '{"coi": 1, "kind": "session", "id": "%s", "tool": "%s", "workspace": "%s", "slot": 1, "container": "coi-1a2b3c4d-1", "image": "coi", "persistent": false, "created_at": "%s", "updated_at": "%s", "files": 1, "bytes": 6}\n' \
    "$id" "$tool" "$ws" "$updated" "$updated" > "$dir/metadata.json"
}

@test "coi session list with no sessions prints one friendly line" {
  run --separate-stderr coi session list
  assert_success
  assert_output "no saved sessions for $WS"
  assert_equal "$stderr" ""
}

@test "coi session list --all --format json with no sessions is an empty listing" {
  run --separate-stderr coi session list --all --format json
  assert_success
  assert_output '{"coi": 1, "kind": "session_list", "sessions": []}'
  assert_equal "$stderr" ""
}

@test "coi session list shows this workspace's sessions newest first" {
  plant s-old 2026-03-01T09:00:00.000000Z
  plant s-new 2026-03-01T10:30:00.000000Z
  plant s-elsewhere 2026-03-02T00:00:00.000000Z /somewhere/else
  run --separate-stderr coi session list
  assert_success
  assert_equal "${lines[0]}" "SESSION  TOOL   UPDATED              SLOT  FILES  WORKSPACE"
  assert_equal "${lines[1]}" "s-new    dummy  2026-03-01 10:30:00  1     1      $WS"
  assert_equal "${lines[2]}" "s-old    dummy  2026-03-01 09:00:00  1     1      $WS"
  assert_equal "${#lines[@]}" 3
}

@test "coi-session list is coi session list" {
  plant s-one 2026-03-01T09:00:00.000000Z
  run coi session list --format json
  local via_coi=$output
  run coi-session list --format json
  assert_success
  assert_equal "$output" "$via_coi"
  run json_get "d['kind'], [(s['kind'], s['id'], s['workspace'] == '$WS') for s in d['sessions']]"
  assert_output "session_list [('session', 's-one', True)]"
}

@test "corrupt metadata is skipped with one warning naming the file" {
  plant s-good 2026-03-01T09:00:00.000000Z
  plant s-bad 2026-03-01T09:00:00.000000Z
  printf '{"coi": 1, "kind": "sess' > "$HOME/.coi/sessions-dummy/s-bad/metadata.json"
  run --separate-stderr coi session list --format json
  assert_success
  run json_get "[s['id'] for s in d['sessions']]"
  assert_output "['s-good']"
  assert_equal "$(printf '%s\n' "$stderr" | wc -l)" 1
  [[ "$stderr" == *"sessions-dummy/s-bad/metadata.json: not valid JSON"* ]]
}

@test "coi session latest prints the newest id of the workspace" {
  plant s-old 2026-03-01T09:00:00.000000Z
  plant s-new 2026-03-01T09:00:00.000001Z
  run --separate-stderr coi-session latest
  assert_success
  assert_output "s-new"
}

@test "coi info without sessions exits 3 in one line" {
  run coi info
  assert_failure 3
  assert_equal "${#lines[@]}" 1
  assert_output --partial "no saved session for $WS"
}

@test "coi info outside any workspace with sessions shows the newest of every workspace" {
  plant s-old 2026-03-01T09:00:00.000000Z /somewhere
  plant s-new 2026-03-02T09:00:00.000000Z /elsewhere
  run --separate-stderr coi info
  assert_success
  assert_line --partial "s-new"
  assert_equal "$stderr" "coi: no saved session for $WS; the newest of every workspace is s-new (/elsewhere)"
  run coi info --workspace "$WS"
  assert_failure 3
}

@test "coi info shows the latest session of the workspace and how to resume it" {
  plant s-one 2026-03-01T09:00:00.000000Z
  run --separate-stderr coi info
  assert_success
  assert_line "session:      s-one"
  assert_line "workspace:    $WS"
  assert_line "resume:       coi shell --resume=s-one (in $WS)"
}

@test "a malformed session id is one line and exit 2, also asked for JSON" {
  run coi session show '../../etc'
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  run --separate-stderr coi session show '../../etc' --format json
  assert_failure 2
  run json_get "d['kind'], d['code']"
  assert_output "error bad_input"
}

@test "coi session show of an unknown id exits 3" {
  run coi session show s-none
  assert_failure 3
  assert_equal "${#lines[@]}" 1
}

@test "coi session delete removes the session and says so" {
  plant s-one 2026-03-01T09:00:00.000000Z
  run coi session delete s-one
  assert_success
  assert_output "deleted session s-one (dummy, $WS, 2026-03-01 09:00:00)"
  [ ! -e "$HOME/.coi/sessions-dummy/s-one" ]
}

@test "coi session prune --keep 1 keeps the newest of each workspace" {
  plant s-1 2026-03-01T01:00:00.000000Z
  plant s-2 2026-03-01T02:00:00.000000Z
  plant s-3 2026-03-01T03:00:00.000000Z
  plant s-x 2026-01-01T00:00:00.000000Z /somewhere/else
  run --separate-stderr coi session prune --keep 1 --all --format json
  assert_success
  assert_equal "${#lines[@]}" 2
  run "$PY" -c 'import json, sys; print(*[json.loads(r)["kind"] + ":" + json.loads(r)["id"]
                                          for r in sys.argv[1:]])' "${lines[@]}"
  assert_output "session_deleted:s-1 session_deleted:s-2"
  run coi session list --all --format json
  run json_get "len(d['sessions'])"
  assert_output "2"
}

@test "coi clean --sessions deletes every saved session, and asks first without --force" {
  plant s-one 2026-03-01T09:00:00.000000Z
  plant s-two 2026-03-02T09:00:00.000000Z /elsewhere
  run coi clean --sessions < /dev/null
  assert_failure 2
  assert_output --partial "asks for confirmation, and there is no terminal"
  [ -d "$HOME/.coi/sessions-dummy/s-one" ]
  run --separate-stderr coi clean --sessions --force
  assert_success
  assert_line "deleted session s-one (dummy, $WS)"
  assert_line "deleted session s-two (dummy, /elsewhere)"
  [ ! -e "$HOME/.coi/sessions-dummy/s-one" ] && [ ! -e "$HOME/.coi/sessions-dummy/s-two" ]
  run coi clean --all --force
  assert_success
  assert_output "nothing to clean"
}

@test "coi session prune with a bad duration exits 2 in one line" {
  run coi session prune --older-than 3y
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "duration '3y'"
}

@test "coi-session save without a name reads a slot record and refuses empty input" {
  run coi-session save </dev/null
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "expected a JSON record on standard input"
}

@test "coi-session restore refuses a record of the wrong kind" {
  plant s-one 2026-03-01T09:00:00.000000Z
  run coi-session restore s-one <<<'{"coi": 1, "kind": "image", "alias": "x"}'
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "expected a record of kind slot"
}

@test "coi shell --resume with a malformed id exits 2 in one line" {
  run coi shell --resume='../x' </dev/null
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "session id '../x'"
}

@test "coi help session shows the session commands in coi terms" {
  run coi help session
  assert_success
  assert_line --partial "  coi session list [--workspace DIR | --all]"
  refute_output --partial "coi-session"
}

@test "a session with corrupt metadata can still be deleted" {
  plant s-bad 2026-03-01T09:00:00.000000Z
  printf 'garbage' > "$HOME/.coi/sessions-dummy/s-bad/metadata.json"
  run coi session show s-bad
  assert_failure 1
  assert_output --partial "coi session delete s-bad removes it"
  run coi session delete s-bad
  assert_success
  [ ! -e "$HOME/.coi/sessions-dummy/s-bad" ]
}
