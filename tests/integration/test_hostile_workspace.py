"""The agent attacks the host through the workspace, as the issue tried it: every
attack runs inside a real container started by the installed coi of a non-root
incus-admin member, in the default (restricted) network mode, and must fail,
while ordinary work (editing, committing) still succeeds.

Each attack prints `OPEN <name>` when it got through and `BLOCKED <name>` when
it did not, so a failure names the hole.
"""

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from coi_common import naming

pytestmark = pytest.mark.incus

ATTACKS = r"""
try() {
  name=$1; shift
  if "$@" >/dev/null 2>&1; then echo "OPEN $name"; else echo "BLOCKED $name"; fi
}
cd /workspace
try hook sh -c 'printf "#!/bin/sh\ntouch $MARK\n" > .git/hooks/pre-commit'
try hooks-path git config core.hooksPath /workspace/planted
try fsmonitor git config core.fsmonitor /workspace/planted/run
try attributes sh -c 'echo "* filter=x" > .git/info/attributes'
try commondir sh -c 'echo planted > .git/commondir'
try device sudo mknod /workspace/zero c 1 5
try devcontainer sh -c 'echo "{}" > .devcontainer/devcontainer.json'
try rename-git mv .git .git-old
try rename-hooks mv .git/hooks .git/hooks-old
try remove-config rm -f .git/config
try claude-settings sh -c 'mkdir -p .claude && echo "{}" > .claude/settings.json'
try vscode sh -c 'mkdir -p .vscode && echo "{}" > .vscode/tasks.json'
try umount sudo umount /workspace/.git/hooks
try umount-lazy sudo umount -l /workspace/.git/config
try remount-rw sudo mount -o remount,rw,bind /workspace/.git/hooks
try bind-without-submounts sh -c 'sudo mkdir -p /mnt/w && sudo mount --bind /workspace /mnt/w'
try move sh -c 'sudo mkdir -p /mnt/h && sudo mount --make-private /workspace &&
  sudo mount --move /workspace/.git/hooks /mnt/h'
try unshare-umount sudo unshare -m sh -c 'umount /workspace/.git/hooks'
mkdir -p planted
printf '#!/bin/sh\ntouch %s\n' "$MARK" > planted/pre-commit
printf '#!/bin/sh\ntouch %s\n' "$MARK" > planted/run
chmod +x planted/pre-commit planted/run
echo change > work.txt
git add work.txt &&
  git -c user.name=agent -c user.email=agent@example.invalid commit -qm "agent work" &&
  echo COMMITTED
git branch agent-branch && echo BRANCHED
git clone -q --bare /workspace /tmp/mirror && git -C /tmp/mirror branch -q fetched &&
  git fetch -q /tmp/mirror fetched:refs/heads/fetched && echo FETCHED
"""


def host_git(user_coi, *args):
    return user_coi.user.run(["git", *args], cwd=user_coi.workspace)


@pytest.fixture
def repository(user_coi):
    """The member's workspace as a git repository with one commit, made on the host."""
    for args in (["init", "-q"], ["config", "user.name", "host"],
                 ["config", "user.email", "host@example.invalid"]):
        assert host_git(user_coi, *args).returncode == 0
    (user_coi.workspace / "README").write_text("hello\n")
    shutil.chown(user_coi.workspace / "README", user_coi.user.uid, user_coi.user.gid)
    host_git(user_coi, "add", "README")
    assert host_git(user_coi, "commit", "-qm", "first").returncode == 0
    return user_coi


def test_git_metadata_and_tool_settings_cannot_be_planted_but_commits_still_work(repository):
    user_coi = repository
    mark = f"/tmp/coi-test-planted-{secrets.token_hex(4)}"  # on the host, if anything ran
    done = user_coi("run", "--env", f"MARK={mark}", "--", "sh", "-c", ATTACKS)
    assert done.returncode == 0, done.stderr
    opened = [line for line in done.stdout.splitlines() if line.startswith("OPEN")]
    assert opened == [], f"attacks that got through: {opened}\n{done.stdout}"
    assert "COMMITTED" in done.stdout, done.stdout
    assert "BRANCHED" in done.stdout, done.stdout
    assert "FETCHED" in done.stdout, done.stdout
    assert "paths read-only inside" in done.stderr
    # On the host, the user's git afterwards runs nothing the agent planted.
    status = host_git(user_coi, "status", "--short")
    commit = host_git(user_coi, "commit", "-q", "--allow-empty", "-m", "host after")
    assert status.returncode == 0, status.stderr + commit.stderr
    assert commit.returncode == 0, status.stderr + commit.stderr
    assert not Path(mark).exists(), "host git ran code the agent planted"
    log = host_git(user_coi, "log", "--format=%s").stdout.split("\n")
    assert log[:3] == ["host after", "agent work", "first"]
    assert not (user_coi.workspace / ".git" / "hooks" / "pre-commit").exists()
    assert (user_coi.workspace / ".git" / "commondir").read_text() == ".\n"
    assert "hooksPath" not in (user_coi.workspace / ".git" / "config").read_text()


def test_secret_files_are_empty_inside_and_untouched_on_the_host(user_coi):
    workspace = user_coi.workspace
    files = {".env": "API_KEY=host-only\n", "api/.env.local": "TOKEN=host-only\n",
             "certs/server.pem": "-----BEGIN PRIVATE KEY-----\n",
             ".env.example": "API_KEY=\n"}
    for rel, text in files.items():
        path = workspace / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        for made in (path, path.parent):
            shutil.chown(made, user_coi.user.uid, user_coi.user.gid)
    script = ("for f in .env api/.env.local certs/server.pem .env.example; do "
              "printf '%s=[%s]\\n' $f \"$(cat $f)\"; done; "
              "sudo umount /workspace/.env 2>/dev/null && echo OPEN umount; "
              "echo x > .env 2>/dev/null && echo OPEN write; true")
    masked = user_coi("run", "--", "sh", "-c", script)
    assert masked.returncode == 0, masked.stderr
    assert ".env=[]" in masked.stdout
    assert "api/.env.local=[]" in masked.stdout
    assert "certs/server.pem=[]" in masked.stdout
    assert ".env.example=[API_KEY=]" in masked.stdout, "an excepted name was masked"
    assert "OPEN" not in masked.stdout
    assert "3 secret files shown empty" in masked.stderr
    for rel, text in files.items():
        assert (workspace / rel).read_text() == text
    shown = user_coi("run", "--no-mask", "--", "cat", ".env")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == files[".env"], shown.stderr


def test_a_protected_path_that_is_a_link_is_refused_before_anything_exists(user_coi,
                                                                             incus_client):
    link = user_coi.workspace / ".vscode"
    link.symlink_to("/etc")
    done = user_coi("run", "--", "true")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "'.vscode'" in done.stderr
    assert "symbolic link" in done.stderr
    assert incus_client.instances(user_coi.prefix) == []


def test_missing_protected_paths_become_inert_placeholders_outside_git_status(repository):
    user_coi = repository
    done = user_coi("run", "--", "sh", "-c", "ls -ld .vscode .husky .git/hooks .claude")
    assert done.returncode == 0, done.stderr
    for rel in (".vscode", ".husky", ".claude"):
        path = user_coi.workspace / rel
        assert path.is_dir(), rel
        assert list(path.iterdir()) == [], rel
        assert path.stat().st_uid == user_coi.user.uid
    assert host_git(user_coi, "status", "--porcelain").stdout == ""
    assert not (user_coi.workspace / ".coi.toml").exists()


SECRET_HALVES = ("coi-test-secret-", secrets.token_hex(6))


@pytest.fixture
def planted_home(user_coi):
    """Host secrets in the member's home, each holding the marker; removed afterwards."""
    home = Path(user_coi.user.home)
    marker = "".join(SECRET_HALVES)
    files = {".ssh/id_ed25519": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{marker}\n",
             ".aws/credentials": f"[default]\naws_secret_access_key = {marker}\n",
             ".gitconfig": f"[credential]\n\thelper = store\n[user]\n\tname = {marker}\n",
             ".git-credentials": f"https://u:{marker}@example.invalid\n"}
    made = []
    for rel, text in files.items():
        path = home / rel
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700)
            shutil.chown(path.parent, user_coi.user.uid, user_coi.user.gid)
            made.append(path.parent)
        path.write_text(text)
        shutil.chown(path, user_coi.user.uid, user_coi.user.gid)
        made.append(path)
    yield marker
    for path in reversed(made):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def test_host_secrets_asked_for_by_the_workspace_are_nowhere_in_the_container(
        user_coi, planted_home):
    (user_coi.workspace / ".coi.toml").write_text(
        '[tools.dummy]\ncredential_files = [".ssh/id_ed25519", ".aws/credentials", '
        '".git-credentials"]\ninject_credentials = true\n'
        '[image]\nextra_ca_certificates = ["~/.ssh/id_ed25519"]\n'
        '[defaults]\nenvironment = { SSH_AUTH_SOCK = "/tmp/agent.sock" }\n')
    host_env = {"GITHUB_TOKEN": planted_home, "AWS_SECRET_ACCESS_KEY": planted_home,
                "SSH_AUTH_SOCK": f"/tmp/{planted_home}.sock"}
    # The marker is rebuilt inside from two halves into a pattern file under /dev (not
    # searched), so no command line and no searched file holds it whole.
    search = ('printf %s "$1$2" > /dev/shm/pattern; sudo grep -rIl --exclude-dir=proc '
              '--exclude-dir=sys --exclude-dir=dev -f /dev/shm/pattern / ; '
              'sudo sh -c \'cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline\' | tr "\\0" "\\n" '
              '| grep -c -f /dev/shm/pattern; env | grep -c SSH_AUTH_SOCK; true')
    done = user_coi("run", "--", "sh", "-c", search, "find", *SECRET_HALVES, env=host_env,
                    timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"], f"secrets found inside:\n{done.stdout}"
    for key in ("defaults.environment", "image.extra_ca_certificates", "tools.dummy"):
        assert f"coi: ignoring {key}" in done.stderr, done.stderr


def test_the_view_leaves_nothing_mounted_on_the_host(user_coi):
    done = user_coi("run", "--persistent", "--", "true")
    assert done.returncode == 0, done.stderr
    name = naming.container_name(str(user_coi.workspace), 1, user_coi.prefix)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f"/run/coi/views/{name}" not in mounts
    again = user_coi("run", "--persistent", "--slot", "1", "--", "cat", "/workspace/.env")
    assert again.returncode in (0, 1), again.stderr  # started again on a fresh view
    assert f"/run/coi/views/{name}" not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("plant", ["ln -s /dev/zero .coi.toml", "mkfifo .coi.toml",
                                   "head -c 2M /dev/zero | tr '\\0' a > .coi.toml"])
def test_a_config_file_planted_during_the_session_neither_hangs_nor_keeps_it(
        user_coi, incus_client, plant):
    """The session still ends (saved, container deleted) with a one-line warning; the
    next session is refused in one line until the user removes the file."""
    done = user_coi("run", "--", "sh", "-c", f"{plant} && echo planted", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "planted" in done.stdout
    assert f"coi: ignoring {user_coi.workspace}/.coi.toml" in done.stderr, done.stderr
    assert incus_client.instances(user_coi.prefix) == []
    again = user_coi("run", "--", "true", timeout=60)
    assert again.returncode == 2, again.stderr
    assert again.stderr.count("\n") == 1
    assert ".coi.toml" in again.stderr


@pytest.fixture
def privileged_profile(incus_client):
    """A test profile like coi's, but privileged (uid 0 inside is host uid 0)."""
    name = f"coi-test-priv-{secrets.token_hex(3)}"
    subprocess.run(["incus", "profile", "copy", "coi", name], check=True, capture_output=True)
    try:
        subprocess.run(["incus", "profile", "set", name, "security.privileged=true"],
                       check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["incus", "profile", "delete", name], check=False, capture_output=True)


def test_a_workspace_file_cannot_pick_the_profile_socket_or_project(user_coi,
                                                                    privileged_profile):
    (user_coi.workspace / ".coi.toml").write_text(
        f'[incus]\nprofile = "{privileged_profile}"\nsocket = "/tmp/coi-test-none.sock"\n'
        'project = "coi-test-elsewhere"\n')
    done = user_coi("run", "--", "head", "-1", "/proc/self/uid_map")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] != ["0", "0"], "the privileged profile was used"
    assert int(done.stdout.split()[1]) >= 1000000
    for key in ("incus.profile", "incus.socket", "incus.project"):
        assert f"coi: ignoring {key}" in done.stderr, done.stderr
