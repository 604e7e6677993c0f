"""The JSON contract: records, validation, errors, and the documented examples."""

import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from coi_common import protocol
from coi_common.errors import BadInput, NotFound

ROOT = Path(__file__).resolve().parents[2]

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_examples():
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", DOC.read_text(),
                                                      flags=re.S)]


def test_every_documented_example_is_a_valid_record():
    examples = documented_examples()
    assert examples
    for example in examples:
        assert protocol.validate(example) is example


def test_every_known_kind_has_a_documented_example():
    documented = {example["kind"] for example in documented_examples()}
    assert documented == set(protocol.REQUIRED_FIELDS)


def test_make_record_starts_with_version_and_kind():
    record = protocol.make_record("version", coi_version="1", python_version="3", incus="x")
    assert list(record)[:2] == ["coi", "kind"]
    assert record["coi"] == protocol.CONTRACT_VERSION


def test_error_record_carries_code_message_and_exit_code():
    record = protocol.error_record(NotFound("container x: gone", hint="see coi list"))
    assert record["code"] == "not_found"
    assert record["message"] == "container x: gone (see coi list)"
    assert record["exit_code"] == 3
    protocol.validate(record, "error")


def test_records_are_written_one_per_line():
    out = io.StringIO()
    for record in [protocol.make_record("setup", changed=False, steps=[])] * 3:
        protocol.write_record(record, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["kind"] == "setup" for line in lines)


def test_unknown_fields_are_ignored_by_readers():
    text = '{"coi": 1, "kind": "setup", "changed": true, "steps": [], "future": 42}'
    assert protocol.parse_record(text, "setup")["changed"] is True


@pytest.mark.parametrize(("text", "problem"), [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"kind": "setup"}', "no integer 'coi'"),
    ('{"coi": "1", "kind": "setup"}', "no integer 'coi'"),
    ('{"coi": true, "kind": "setup"}', "no integer 'coi'"),
    ('{"coi": 2, "kind": "setup", "changed": true, "steps": []}', "contract version 2"),
    ('{"coi": 1, "kind": "doctor", "ok": true, "checks": []}', "expected a record of kind setup"),
    ('{"coi": 1, "kind": "setup", "changed": true}', "missing field steps"),
])
def test_bad_input_is_refused_with_a_message_naming_the_problem(text, problem):
    with pytest.raises(BadInput) as err:
        protocol.parse_record(text, "setup")
    assert problem in err.value.one_line()
    assert "\n" not in err.value.one_line()


def test_newer_contract_version_says_to_upgrade():
    with pytest.raises(BadInput) as err:
        protocol.parse_record('{"coi": 9, "kind": "setup"}')
    assert err.value.hint == "upgrade coi"


def test_read_record_skips_blank_lines_and_refuses_empty_input():
    stream = io.StringIO('\n\n{"coi": 1, "kind": "setup", "changed": false, "steps": []}\n')
    assert protocol.read_record("setup", stream)["kind"] == "setup"
    with pytest.raises(BadInput, match="got nothing"):
        protocol.read_record("setup", io.StringIO(""))


@pytest.mark.parametrize("depth", [65, 100_000])
def test_json_nested_too_deeply_is_bad_input_never_a_recursion_error(depth):
    with pytest.raises(BadInput) as refused:
        protocol.loads("[" * depth + "]" * depth)
    assert "nested more than 64 levels" in refused.value.one_line()


def test_json_of_ordinary_depth_is_read():
    assert protocol.loads('{"a": ' * 10 + "1" + "}" * 10)["a"]["a"]["a"] is not None


@pytest.mark.parametrize("argv", [["coi-net", "apply", "--dry-run"], ["coi-session", "save"]])
def test_executables_refuse_a_deeply_nested_stdin_record_in_one_line(argv):
    deep = '{"coi": 1, "kind": "slot", "x": ' + "[" * 50_000 + "]" * 50_000 + "}\n"
    done = subprocess.run([str(ROOT / "bin" / argv[0]), *argv[1:]], input=deep, text=True,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "nested more than" in done.stderr
    assert "Traceback" not in done.stderr
    assert "internal error" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
