"""The exact diagonal of the GGN / Fisher / empirical Fisher as a structured CoLA operator."""

from __future__ import annotations

from typing import Any

from cola_curvature._checks import check_mc_samples
from cola_curvature.operators._bound import DataBound
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import DiagonalBlock
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.options import FisherType, parse_option


class DiagonalCurvature(DataBound, ParameterKroneckerFactored):
    r"""The exact diagonal ``diag(C)`` of a curvature ``C = R Σ_n J_nᵀ M_n J_n``.

    ``diag(C)_i = R Σ_{n,c} (J_nᵀ u_{n,c})_i²`` with the output cotangents of
    ``fisher_type``: type-2 (``Σ_c u uᵀ = ∇²_f ℓ``: the GGN's diagonal), mc (sampled
    gradients: the Monte-Carlo Fisher's) or empirical (the empirical Fisher's). As a
    :class:`KroneckerFactored` with one diagonal block, every structured rule applies
    (``inv``, ``logdet``, ``sqrt``, ``eig``, damping) in ``O(D)``.

    Cost of the build per batch: one forward pass plus ``C'`` per-example reverse passes
    (``vmap`` over examples; models must not mix examples, e.g. no train-mode batch norm).
    Memory: the ``N · C'`` per-example gradients of a batch are held in chunks of at most
    64 MiB (:mod:`~cola_curvature.kfac_statistics.chunking`), so a language model's
    vocabulary × context columns do not need ``N · C' · D`` numbers at once.
    Annotation: ``PSD``.

    Args:
        model: As for :class:`~cola_curvature.GGN`.
        loss_func: As for :class:`~cola_curvature.GGN`.
        params: As for :class:`~cola_curvature.GGN`.
        data: As for :class:`~cola_curvature.GGN`.
        fisher_type: ``"type-2"`` (default), ``"mc"`` or ``"empirical"``.
        mc_samples: Samples per example for ``"mc"``.
        seed: Seed of the sampled targets for ``"mc"``.
        **data_options: ``num_data``, ``batch_size_fn``, ``check_deterministic``,
            ``progressbar``, ``distributed`` (the diagonal is summed over the ranks), as for
            every data-bound operator (:class:`~cola_curvature.operators._bound.DataBound`).
    """

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        fisher_type: str | FisherType = "type-2",
        mc_samples: int = 1,
        seed: int = 0,
        **data_options: Any,
    ) -> None:
        self.fisher_type = parse_option(FisherType, fisher_type, "fisher_type")
        if self.fisher_type is FisherType.FORWARD_ONLY:
            raise ValueError(
                "DiagonalCurvature needs output cotangents; use fisher_type 'type-2', 'mc' "
                "or 'empirical'."
            )
        check_mc_samples(mc_samples)
        self._bind(model, loss_func, params, data, **data_options)
        data = self._data
        total = 0
        with self._backend.preserved_state():
            for batch, rng in data.sampled_batches("curvature diagonal", seed):
                total = total + self._backend.curvature_diagonal(
                    batch, data.num_data, self.fisher_type, mc_samples, rng
                )
        total = data.combine(total)
        xnp = DiagonalBlock(total).xnp
        identity = xnp.arange(total.shape[0], device=xnp.get_device(total))
        KroneckerFactored.__init__(self, [DiagonalBlock(total)], identity)
