"""What the workspace view protects and masks, decided from the project's own files
(the mounts, coi_host.views, are proven against real containers in
tests/integration/test_hostile_workspace.py)."""

import os
import secrets
from pathlib import Path

import pytest

from coi_common import config, views
from coi_common.errors import BadInput, CoiError
from coi_host import views as mounts
from coi_shell import placeholders


def test_mask_patterns_match_names_anywhere_and_bang_excepts():
    patterns = list(config.MASKED_FILES)
    for name in (".env", ".env.local", "server.pem", "id_ed25519", "id_rsa.pub", ".npmrc",
                 "credentials.json"):
        assert views.masks(name, patterns), name
    for name in (".env.example", "README.md", "env", "pem", "my.env"):
        assert not views.masks(name, patterns), name


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", ".git/../../x", "a//b", "./a", ""])
def test_a_protected_path_leaving_the_workspace_is_refused(bad):
    with pytest.raises(BadInput) as refused:
        views.check_rules([bad], [])
    assert "protected path" in refused.value.one_line()


def test_a_mask_pattern_with_a_slash_is_refused():
    with pytest.raises(BadInput):
        views.check_rules([], ["secrets/*.pem"])


def test_missing_paths_become_placeholders_and_the_targets_say_what_is_protected(tmp_path):
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".claude").mkdir()
    targets = placeholders.placeholders(str(tmp_path), list(config.PROTECTED_PATHS), None)
    assert ".git/hooks/" in targets
    assert ".git/info/" in targets  # the missing directory above a missing file
    assert ".claude/settings.json" in targets  # .claude exists: the file is made
    assert (tmp_path / ".claude" / "settings.json").read_text() == "{}\n"
    assert (tmp_path / ".git" / "info").is_dir()
    assert (tmp_path / ".git" / "commondir").read_text() == ".\n"  # git: this repository
    assert (tmp_path / ".vscode").is_dir()
    assert not (tmp_path / ".coi.toml").exists()  # top-level files are not made
    again = placeholders.placeholders(str(tmp_path), list(config.PROTECTED_PATHS), None)
    assert set(again) >= {".git/hooks/", ".claude/settings.json", ".vscode/"}


def test_a_placeholder_another_coi_made_first_is_not_an_error(tmp_path, monkeypatch):
    """Five `coi run` in one project at once: each sees .vscode missing, one makes it."""
    real_create = placeholders._create

    def the_other_coi_wins(folder, name, *, directory):
        real_create(folder, name, directory=directory)  # the concurrent coi, just before
        real_create(folder, name, directory=directory)

    monkeypatch.setattr(placeholders, "_create", the_other_coi_wins)
    targets = placeholders.placeholders(str(tmp_path), [".vscode/", ".git/hooks/"], None)
    assert targets == [".vscode/", ".git/"]
    assert (tmp_path / ".vscode").is_dir()
    assert (tmp_path / ".git").is_dir()


def test_without_git_only_git_itself_is_made(tmp_path):
    targets = placeholders.placeholders(str(tmp_path), [".git/hooks/", ".git/config"], None)
    assert targets == [".git/"]
    assert (tmp_path / ".git").is_dir()
    assert list((tmp_path / ".git").iterdir()) == []


def test_a_link_where_a_protected_path_lies_is_refused_and_nothing_is_made(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    project = tmp_path / "project"
    project.mkdir()
    (project / ".claude").symlink_to(outside)
    with pytest.raises(BadInput) as refused:
        placeholders.placeholders(str(project), [".claude/settings.json"], None)
    assert "symbolic link" in refused.value.one_line()
    assert list(outside.iterdir()) == []


def test_a_view_directory_emptied_by_a_reboot_is_made_again():
    name = f"coi-test-{secrets.token_hex(4)}-1"
    source = Path(views.VIEW_ROOT) / name
    instances = [{"name": name, "devices": {"workspace": {"source": str(source)}}},
                 {"name": "other", "devices": {"workspace": {"source": "/srv/project"}}}]
    try:
        assert mounts.keep_directories(instances) == [name]
        assert source.is_dir()
        assert mounts.keep_directories(instances) == []
    finally:
        mounts.release(name, forget=True)
    assert not source.exists()
    assert os.path.isdir(views.VIEW_ROOT)


def test_a_workspace_the_view_cannot_open_is_one_line(tmp_path):
    name = f"coi-test-{secrets.token_hex(4)}-1"
    try:
        with pytest.raises(CoiError) as refused:
            mounts.build(name, str(tmp_path / "gone"), [], [])
    finally:
        mounts.release(name, forget=True)
    assert "cannot build the view of the workspace" in refused.value.one_line()
