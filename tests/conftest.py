"""Fixtures generated from the case matrix in ``tests/cases.py``."""

import pytest

from tests.cases import CASES


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request):
    """One ``Case`` of the matrix."""
    return request.param


@pytest.fixture
def problem(case):
    """``(model, loss_func, params, data)`` built from the case."""
    return case.build()
