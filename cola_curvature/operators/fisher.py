"""The Monte-Carlo Fisher as a matrix-free CoLA operator."""

from __future__ import annotations

from typing import Any

from cola.annotations import PSD

from cola_curvature._checks import check_mc_samples
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._output_space import MonteCarloFisherOutputMatmat
from cola_curvature.types import Array


class FisherMC(CurvatureOperator):
    r"""Monte-Carlo Fisher ``F̂ = (R / M) Σ_n Σ_m J_nᵀ d̂_{nm} d̂_{nm}ᵀ J_n`` (Martens, 2014).

    ``d̂_{nm} = ∇_f ℓ(f_n, ŷ_{nm})`` with ``ŷ_{nm} ~ q(· | f_n)`` drawn from the
    likelihood whose negative log is the loss, ``M = mc_samples``. Since
    ``E[d̂ d̂ᵀ] = ∇²_f ℓ``, ``F̂`` is an unbiased estimate of the GGN and converges to it as
    ``M`` grows. Example ``n``'s targets are drawn afresh in every product from a stream
    keyed by ``seed`` and ``n``'s global position in the data, so ``F̂`` is one fixed PSD
    matrix for a given ``seed``, whatever the split of the same examples into batches.

    Shapes: ``D`` parameter entries; ``F̂ @ v`` takes ``(D,)``, ``(D, k)`` or a list of
    tensors shaped like ``params``.

    Cost per product and batch: as the GGN (about 1.5 gradients per column) plus
    sampling. Annotation: ``PSD``.

    Reference: Martens, "New insights and perspectives on the natural gradient method",
    JMLR 2020, arXiv:1412.1193.

    Args:
        *args: As :class:`~cola_curvature.operators._base.CurvatureOperator`.
        mc_samples: Number ``M`` of sampled targets per example.
        seed: Seed of the private streams the targets are drawn from.
        **kwargs: As :class:`~cola_curvature.operators._base.CurvatureOperator`
            (``compile=True`` raises ``NotImplementedError``).

    """

    annotation = PSD

    def __init__(self, *args: Any, mc_samples: int = 1, seed: int = 0, **kwargs: Any) -> None:
        check_mc_samples(mc_samples)
        self._mc_samples = mc_samples
        self._seed = seed
        super().__init__(*args, **kwargs)

    def _sampling_seed(self) -> int:
        """Return ``seed``: every product draws the same targets from it."""
        return self._seed

    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return ``(R / M) Σ_{n,m} J_nᵀ d̂_{nm} d̂_{nm}ᵀ J_n V`` on one batch."""
        output_matmat = MonteCarloFisherOutputMatmat(self._loss, self.num_data, self._mc_samples)
        return self._backend.gauss_newton_matmat(columns, batch, output_matmat, rng)
