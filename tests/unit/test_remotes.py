"""Reading the incus client's remotes (lib/coi_common/remotes.py): only an Incus server
over HTTPS with both certificates on disk is a target; every other case names its fix."""

from __future__ import annotations

import pytest

from coi_common import remotes
from coi_common.errors import BadInput, ConfigError

CONFIG = """default-remote: local
remotes:
  images:
    addr: https://images.linuxcontainers.org
    protocol: simplestreams
    public: true
  local:
    addr: unix://
    protocol: incus
    public: false
  build:
    addr: "https://10.1.2.3:8443"
    project: ci
    protocol: incus
    public: false
  v6:
    addr: https://[fd00::5]
    protocol: incus
aliases: {}
"""


@pytest.fixture
def conf(tmp_path):
    (tmp_path / "config.yml").write_text(CONFIG)
    (tmp_path / "servercerts").mkdir()
    for name in ("client.crt", "client.key", "servercerts/build.crt", "servercerts/v6.crt",
                 "servercerts/images.crt", "servercerts/local.crt"):
        (tmp_path / name).write_text("x")
    return tmp_path


def test_a_remote_is_read_with_its_address_project_and_certificates(conf):
    found = remotes.find("build", str(conf))
    assert (found.host, found.port, found.project) == ("10.1.2.3", 8443, "ci")
    assert found.server_cert == str(conf / "servercerts" / "build.crt")
    assert found.client_key == str(conf / "client.key")


def test_an_ipv6_address_without_a_port_gets_incus_port(conf):
    found = remotes.find("v6", str(conf))
    assert (found.host, found.port, found.project) == ("fd00::5", 8443, "default")


@pytest.mark.parametrize(("name", "problem"), [
    ("images", "not an Incus server"),
    ("local", "https://HOST[:PORT] only"),
    ("elsewhere", "knows no remote 'elsewhere'"),
])
def test_what_is_not_an_https_incus_remote_is_refused_with_its_reason(conf, name, problem):
    with pytest.raises(ConfigError) as caught:
        remotes.find(name, str(conf))
    assert problem in caught.value.one_line()


def test_a_remote_without_its_pinned_server_certificate_is_refused(conf):
    (conf / "servercerts" / "build.crt").unlink()
    with pytest.raises(ConfigError) as caught:
        remotes.find("build", str(conf))
    assert "servercerts/build.crt is missing" in caught.value.one_line()


@pytest.mark.parametrize("name", ["../x", "", "a b", "-x"])
def test_a_malformed_remote_name_is_bad_input(conf, name):
    with pytest.raises(BadInput):
        remotes.find(name, str(conf))


def test_a_config_line_that_is_not_the_clients_yaml_is_refused(conf):
    (conf / "config.yml").write_text("remotes:\n  build\n")
    with pytest.raises(ConfigError) as caught:
        remotes.find("build", str(conf))
    assert "a line coi cannot read" in caught.value.one_line()
