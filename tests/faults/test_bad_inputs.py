# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Every light bad-input case of :mod:`tests.faults.bad_inputs` is refused with a clear message (names the file,
says what is wrong) or accepted with the right result: no crash, nothing silently wrong."""

from __future__ import annotations

import pytest

from .bad_inputs import cases, run_case

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def params():
    return [pytest.param(case, id=case.name) for case in cases() if not case.heavy]


@pytest.mark.parametrize("case", params())
def test_bad_input(case, tmp_path):
    outcome, detail = run_case(case, str(tmp_path))
    expected = "refused" if case.expect == "refuse" else "accepted"
    assert outcome == expected, f"{case.name}: {outcome}: {detail}"
