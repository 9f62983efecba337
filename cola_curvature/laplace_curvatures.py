"""The curvatures of a Laplace posterior: name → ``H``, the GGN of the summed unit-variance NLL.

Every builder returns an operator the dispatch rules handle exactly or matrix-free, with
``scaled`` and ``damped`` (``damped_per_block`` for the Kronecker-factored ones), so the
posterior precision ``P = H / (σ² T) + δ I`` is again such an operator:

* ``"kfac"``, ``"ekfac"``, ``"diag"``, ``"full"``, ``"symmetry"``: Kronecker-factored
  (``"full"``: the exact GGN as one dense block, ``O(D²)`` memory, ``D`` GGN products);
* ``"lowrank"``: ``U diag(s) Uᵀ + diag(d)``, a :class:`DiagonalPlusLowRank`;
* ``"ggn"`` and a user's PSD matrix-free operator: ``c G``, a :class:`ShiftedCurvature`.

The GGN of the unit-variance NLL is ``½`` that of ``MSELoss('sum')`` (``Σ (f − y)²``) and
that of the cross-entropy itself: the NLL scale of :class:`CurvatureRequest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cola
from cola.annotations import PSD
from cola.backends import get_library_fns
from cola.linalg import Algorithm, Eigh
from cola.ops import LinearOperator

from cola_curvature.laplace_subsets import dense_submatrix
from cola_curvature.matfree import SLQ
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators.diagonal import DiagonalCurvature
from cola_curvature.operators.ekfac import EKFAC
from cola_curvature.operators.ggn import GGN
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, KroneckerBlock
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import ShiftedCurvature
from cola_curvature.operators.symmetry import SymmetryCurvature
from cola_curvature.options import LaplaceCurvature
from cola_curvature.types import Array

#: What an index subnetwork's curvature can be: a submatrix of the exact GGN or its diagonal.
INDEX_SUBSET_CURVATURES = ("full", "diag")


@dataclass(frozen=True)
class CurvatureRequest:
    """What a builder needs: the problem (the loss summed) and the Laplace options.

    Attributes:
        data: The Laplace posterior's counted and checked :class:`CurvatureData` (its
            process group included): the operators built on it read nothing again.
        nll_scale: ``½`` for ``MSELoss`` (twice the unit-variance NLL), else ``1``.
        indices: Positions of an index subnetwork in the flattened ``params``, or ``None``.
    """

    model: Any
    loss: Any
    params: Any
    data: CurvatureData
    nll_scale: float
    indices: Array | None
    rank: int
    symmetry_groups: Any
    uncovered: str
    separate_weight_and_bias: bool

    def ggn(self) -> GGN:
        """Return the exact GGN of the loss, matrix-free."""
        return GGN(self.model, self.loss, self.params, self.data)

    def diagonal(self) -> DiagonalCurvature:
        """Return the exact diagonal of the GGN of the loss."""
        return DiagonalCurvature(
            self.model,
            self.loss,
            self.params,
            self.data,
            fisher_type="type-2",
        )


def _kronecker(operator_type: type) -> Callable[[CurvatureRequest], KroneckerFactored]:
    """Return the builder of KFAC or EKFAC (type-2 statistics)."""

    def build(request: CurvatureRequest) -> KroneckerFactored:
        return operator_type(
            request.model,
            request.loss,
            request.params,
            request.data,
            fisher_type="type-2",
            uncovered=request.uncovered,
            separate_weight_and_bias=request.separate_weight_and_bias,
        ).scaled(request.nll_scale)

    return build


def _diagonal(request: CurvatureRequest) -> KroneckerFactored:
    """Return the exact GGN diagonal (its entries in an index subnetwork)."""
    diagonal = request.diagonal()
    if request.indices is not None:
        values = diagonal.diagonal()[request.indices]
        positions = diagonal.xnp.arange(values.shape[0], device=diagonal.device)
        diagonal = KroneckerFactored([DiagonalBlock(values)], positions)
    return diagonal.scaled(request.nll_scale)


def _full(request: CurvatureRequest) -> KroneckerFactored:
    """Return the exact GGN (``E_Sᵀ G E_S`` of an index subnetwork) as one dense block."""
    ggn = request.ggn()
    dense = ggn.to_dense() if request.indices is None else dense_submatrix(ggn, request.indices)
    xnp = get_library_fns(dense.dtype)
    one = xnp.ones((1, 1), dtype=dense.dtype, device=xnp.get_device(dense))
    identity = xnp.arange(dense.shape[0], device=xnp.get_device(dense))
    return KroneckerFactored([KroneckerBlock(request.nll_scale * dense, one)], identity)


def _ggn(request: CurvatureRequest) -> ShiftedCurvature:
    """Return ``c G``: the exact GGN, matrix-free, scaled to the NLL."""
    return ShiftedCurvature(request.ggn(), 0.0, request.nll_scale)


def _low_rank(request: CurvatureRequest) -> DiagonalPlusLowRank:
    """Return ``U diag(s) Uᵀ + diag(max(diag G − diag(U diag(s) Uᵀ), 0))`` of the GGN.

    ``(s, U)``: the top-``rank`` eigenpairs of the GGN by Lanczos; the diagonal is exact.
    """
    ggn = request.ggn()
    if not 0 < request.rank <= ggn.shape[0]:
        raise ValueError(f"rank must be in 1..{ggn.shape[0]}, got {request.rank}.")
    values, vectors = cola.linalg.eig(ggn, request.rank, "LA")
    U = vectors.to_dense()
    xnp = ggn.xnp
    rest = request.diagonal().diagonal() - ((U**2) * values).sum(1)
    low_rank = DiagonalPlusLowRank(xnp.maximum(rest, 0 * rest), U, xnp.diag(values), {PSD})
    return low_rank.scaled(request.nll_scale)


def _symmetry(request: CurvatureRequest) -> KroneckerFactored:
    """Return the symmetry-averaged gradient outer product of the NLL.

    ``∇ NLL = (NLL scale) ∇ loss``, so the outer product scales by its square.
    """
    symmetric = SymmetryCurvature(
        request.model,
        request.loss,
        request.params,
        request.data,
        groups=request.symmetry_groups,
    )
    return symmetric.scaled(request.nll_scale**2)


#: How each named curvature is built.
BUILDERS: dict[LaplaceCurvature, Callable[[CurvatureRequest], LinearOperator]] = {
    LaplaceCurvature.KFAC: _kronecker(KFAC),
    LaplaceCurvature.EKFAC: _kronecker(EKFAC),
    LaplaceCurvature.DIAG: _diagonal,
    LaplaceCurvature.FULL: _full,
    LaplaceCurvature.GGN: _ggn,
    LaplaceCurvature.LOWRANK: _low_rank,
    LaplaceCurvature.SYMMETRY: _symmetry,
}
#: The curvature names, as strings.
CURVATURES = tuple(name.value for name in LaplaceCurvature)


def logdet_algorithm(slq: SLQ | None, size: int) -> Algorithm:
    """Return the quadrature of ``logdet`` for a matrix-free ``P``.

    ``slq`` if given, else the exact rule (``Eigh``) up to the default SLQ budget of ``D``
    product columns (``20 × 30 = 600``), else ``SLQ()``. The rules for the structured
    curvatures are exact and ignore it.
    """
    if slq is not None:
        return slq
    default = SLQ()
    return Eigh() if size <= default.num_probes * default.num_steps else default


def build_curvature(
    curvature: str | KroneckerFactored | CurvatureOperator, request: CurvatureRequest, size: int
) -> KroneckerFactored | DiagonalPlusLowRank | ShiftedCurvature:
    """Return ``H`` for a curvature name, or a user's operator of the summed unit-variance NLL.

    A ``KroneckerFactored`` operator is used as given, a PSD matrix-free one as ``1 · A``.

    Raises:
        ValueError: for an unknown name, a name an index subnetwork cannot restrict to, an
            operator of another size than the ``size`` parameters, or one that is not PSD.
    """
    if isinstance(curvature, (KroneckerFactored, CurvatureOperator)):
        if curvature.shape[0] != size:
            raise ValueError(
                f"curvature has shape {curvature.shape}; the posterior is over {size} parameters."
            )
        if isinstance(curvature, KroneckerFactored):
            return curvature
        if not curvature.isa(PSD):
            raise ValueError(
                f"a matrix-free curvature must be PSD (GGN, FisherMC, EmpiricalFisher); "
                f"{type(curvature).__name__} is not, and log det P would be undefined."
            )
        return ShiftedCurvature(curvature, 0.0, 1.0)
    try:
        curvature = LaplaceCurvature(curvature)
    except ValueError:
        raise ValueError(
            f"Unsupported curvature {curvature!r}; expected one of {CURVATURES} or a "
            "KroneckerFactored operator."
        ) from None
    if request.indices is not None and curvature not in INDEX_SUBSET_CURVATURES:
        raise ValueError(
            f"curvature {curvature.value!r} cannot be restricted to an index subnetwork (only "
            f"{INDEX_SUBSET_CURVATURES}); pass whole tensors as subnetwork=[...] instead."
        )
    return BUILDERS[curvature](request)
