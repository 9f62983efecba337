"""CoLA operator state set directly, for operator types whose annotations are known.

``LinearOperator.__init__`` asks the plum-dispatched ``cola.annotations.get_annotations``
for every new operator's annotations, and ``Kronecker`` and ``BlockDiag`` wrap each
argument in the dispatched ``cola.fns.lazify``. plum cannot cache either resolution (their
methods' signatures hold parametric types), so each call resolves afresh: 0.1–0.5 ms per
operator on an idle CPU, several operators per Kronecker block. The types of
:mod:`~cola_curvature.operators.kronecker_blocks` and
:class:`~cola_curvature.operators.kronecker.KroneckerFactored` know their annotations in
closed form (the rules CoLA would dispatch to) and set them here, with the rest of the state
``LinearOperator.__init__`` sets; ``tests/test_operator_init.py`` holds the result equal to
CoLA's own constructors.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import reduce
from typing import Any

from cola import backends
from cola.ops import LinearOperator


def init_operator(op: LinearOperator, dtype: Any, shape: tuple[int, int], annotations: set) -> None:
    """Set ``dtype``, ``shape``, ``xnp``, ``annotations`` and ``device`` as CoLA's constructor.

    ``annotations`` replaces ``get_annotations(op)``: the caller states what CoLA's rule for
    its type returns. ``op.device``, found from the constructor's arguments by
    ``LinearOperator.__new__``, falls back to the backend's default device. Cost ``O(1)``.
    """
    op.dtype = dtype
    op.shape = shape
    op.xnp = backends.get_library_fns(dtype)
    op.annotations = set(annotations)
    op.device = op.device or op.xnp.get_default_device()


def common_annotations(operators: Iterable[LinearOperator]) -> set:
    """Return the annotations all ``operators`` share: CoLA's rule for ``BlockDiag``."""
    return reduce(lambda left, right: left & right, (op.annotations for op in operators))
