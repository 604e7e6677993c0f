"""Exit codes: one table in code, the same table in docs, distinct per failure kind."""

import re
from pathlib import Path

from coi_common import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md"


def test_documented_exit_codes_match_the_constants():
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", DOC.read_text(), flags=re.M)}
    constants = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    assert documented == constants


def test_usage_not_found_unavailable_and_permission_have_distinct_codes():
    kinds = [errors.UsageError, errors.NotFound, errors.IncusUnavailable,
             errors.PermissionDenied, errors.Interrupted, errors.CoiError]
    assert len({k.exit_code for k in kinds}) == len(kinds)


def test_every_error_kind_has_a_distinct_machine_code():
    codes = [kind.code for kind in errors.ALL_ERRORS]
    assert len(codes) == len(set(codes))


def test_one_line_folds_whitespace_and_appends_the_hint():
    error = errors.IncusError("first\n  second", hint="try this")
    assert error.one_line() == "first second (try this)"
