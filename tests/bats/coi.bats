#!/usr/bin/env bats
# The coi command line as a user meets it: help, errors, config, doctor, version.

setup() {
  load helpers
  isolate_config
}

@test "coi --help lists the commands and exits 0" {
  run coi --help
  assert_success
  assert_line --partial "shell "
  assert_line --partial "doctor "
}

@test "coi with an unknown command prints one line and exits 2" {
  run coi nosuch
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output "coi: 'nosuch' is not a coi command; see 'coi --help'"
}

@test "coi suggests the closest command for a typo" {
  run coi doctr
  assert_failure 2
  assert_output --partial "did you mean 'doctor'?"
}

@test "coi version shows the running Incus server version" {
  run coi version
  assert_success
  assert_line --regexp '^incus: [0-9]+\.[0-9]+'
}

@test "coi config show --format json gives a source for every value" {
  run coi config show --format json
  assert_success
  run json_get "all('source' in v and 'value' in v for v in d['values'].values()) and d['kind']"
  assert_output "config"
}

@test "coi config show names the layer that set a value" {
  printf '[defaults]\npersistent = true\n' > "$XDG_CONFIG_HOME/coi/config.toml"
  COI_NETWORK_MODE=open run coi config show
  assert_success
  assert_line --regexp "^defaults.persistent = true +# $XDG_CONFIG_HOME/coi/config.toml$"
  assert_line --regexp '^network.mode = "open" +# env COI_NETWORK_MODE$'
}

@test "a config value of the wrong type is one line naming the file, key and type" {
  printf '[defaults]\npersistent = "yes"\n' > "$XDG_CONFIG_HOME/coi/config.toml"
  run coi config show
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "$XDG_CONFIG_HOME/coi/config.toml"
  assert_output --partial "defaults.persistent"
  assert_output --partial "boolean"
  refute_output --partial "Traceback"
}

@test "a config error asked for JSON still answers with an error record" {
  printf '[nosuchsection]\nx = 1\n' > "$XDG_CONFIG_HOME/coi/config.toml"
  run --separate-stderr coi config show --format json
  assert_failure 2
  run json_get "d['kind'], d['code']"
  assert_output "error bad_config"
}

@test "coi doctor passes on the set-up machine" {
  run coi doctor
  assert_success
  assert_line --regexp '^ok +daemon: incusd'
  refute_line --regexp '^FAIL'
}

@test "coi doctor --format json is one doctor record" {
  run --separate-stderr coi doctor --format json
  assert_success
  assert_equal "$stderr" ""
  run json_get "d['kind'], d['ok']"
  assert_output "doctor True"
}

@test "coi help NAME shows the command's own help in coi terms" {
  run coi help doctor
  assert_success
  assert_line --index 0 "coi doctor: Check that this machine can run coi, and say how to fix it."
  assert_line "  coi doctor [--format FMT] [--debug]"
  refute_output --partial "coi-host"
}

@test "an unknown output format is refused with exit 2, naming the command" {
  run coi doctor --format yaml
  assert_failure 2
  assert_output "coi doctor: unknown format 'yaml'; use text or json"
}

@test "the bash completion, sourced in bash, completes coi sh to shell and shutdown" {
  run bash -c 'eval "$(coi completion bash)"; COMP_WORDS=(coi sh); COMP_CWORD=1; _coi
    printf "%s\n" "${COMPREPLY[@]}"'
  assert_success
  assert_output $'shell\nshutdown'
}

@test "a tool defined in config with a bad field is reported by config show" {
  printf '[tools.mytool]\nbinary = "mytool"\nstate_dirs = ["/etc"]\n' > "$XDG_CONFIG_HOME/coi/config.toml"
  run coi config show
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "mytool"
  assert_output --partial "state_dirs"
}

@test "selecting an unknown tool is a one-line not-found error listing known tools" {
  COI_TOOL_NAME=nosuchtool run coi config show
  assert_failure 3
  assert_output --partial "unknown tool 'nosuchtool'"
  assert_output --partial "claude"
}

@test "coi sync of a container of this machine says its workspace is mounted, in one line" {
  run coi sync pull coi-1a2b3c4d-1
  assert_failure 2
  assert_equal "${#lines[@]}" 1
  assert_output --partial "coi sync: coi-1a2b3c4d-1 is a container of this machine"
}

@test "coi sync --every takes whole seconds from 1 to 86400" {
  for bad in 0 1.5 -3 86401 x; do
    run coi sync pull coi-1a2b3c4d-1 --every "$bad"
    assert_failure 2
    assert_output --partial "--every"
  done
}
