"""Eigenvalue-corrected KFAC (EKFAC) as a structured CoLA operator."""

from __future__ import annotations

from typing import Any

from cola.backends import get_library_fns

from cola_curvature.kfac_statistics.moments import SignalRequest
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import EigenKronecker
from cola_curvature.options import FisherType, parse_option
from cola_curvature.types import Array


class EKFAC(KFAC):
    r"""EKFAC: KFAC's eigenbasis with eigenvalues refit to the data (George et al., 2018).

    With ``G_l = Q_G Λ_G Q_Gᵀ`` and ``A_l = Q_A Λ_A Q_Aᵀ`` from :class:`KFAC`, every block
    becomes ``(Q_G ⊗ Q_A) diag(vec S) (Q_G ⊗ Q_A)ᵀ`` with
    ``S_ij = R Σ_{n,c} (Q_Gᵀ ∇W_{n,c} Q_A)_ij²``, where ``∇W_{n,c} = Σ_t g_{n,t,c} ã_{n,t}ᵀ``
    is example ``n``'s weight gradient for the backpropagated column ``c`` (same
    ``fisher_type`` as KFAC). ``S`` is the diagonal of the exact curvature block in the
    Kronecker eigenbasis, so EKFAC is never further from it (in Frobenius norm) than KFAC,
    and equals it wherever KFAC is exact. Blocks of uncovered parameters (``uncovered`` as
    for KFAC: ``"diagonal"`` or ``"dense"``) are kept exact, a dense one in its own
    eigenbasis.

    Cost of the build: KFAC's build, the factors' eigen-decompositions, and a second pass
    over the data with the same backward passes. Annotation: ``PSD``.

    Reference: George, Laurent, Bouthillier, Ballas, Vincent, "Fast approximate natural
    gradient descent in a Kronecker-factored eigenbasis", NeurIPS 2018, arXiv:1806.03884.

    Args:
        *args: As :class:`KFAC`.
        **kwargs: As :class:`KFAC`, including ``uncovered`` (``"error"``, ``"diagonal"`` or
            ``"dense"``); ``fisher_type="forward-only"`` is not supported.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fisher_type = kwargs.get("fisher_type", FisherType.TYPE2)
        if parse_option(FisherType, fisher_type, "fisher_type") is FisherType.FORWARD_ONLY:
            raise ValueError(
                "EKFAC needs per-example gradients; fisher_type='forward-only' has none. Use "
                "'type-2', 'mc' or 'empirical'."
            )
        super().__init__(*args, **kwargs)
        eigen_forms = [
            [block.eigen() for block in roles.values() if block is not None]
            for roles in self.layer_blocks()
        ]
        bases = {}
        for layer, eigen in zip(self.layers, eigen_forms, strict=True):
            q_in = (
                eigen[0].q_in if len(eigen) == 1 else _block_diagonal(eigen[0].q_in, eigen[1].q_in)
            )
            bases[layer.name] = (eigen[0].q_out, q_in)
        corrections = self._eigencorrections(bases)
        blocks = []
        for layer, eigen in zip(self.layers, eigen_forms, strict=True):
            eigenvalues = corrections[layer.name]
            if len(eigen) == 1:
                blocks.append(EigenKronecker(*bases[layer.name], eigenvalues))
                continue
            columns = layer.in_features - 1  # a separated layer: the weight's, then the bias
            weight, bias = eigen
            blocks.append(EigenKronecker(weight.q_out, weight.q_in, eigenvalues[:, :columns]))
            blocks.append(EigenKronecker(bias.q_out, bias.q_in, eigenvalues[:, columns:]))
        blocks += [block.eigen() for block in self.blocks[len(blocks) :]]
        KroneckerFactored.__init__(self, blocks, self.permutation)

    def _eigencorrections(self, bases: dict[str, tuple[Array, Array]]) -> dict[str, Array]:
        """Return ``S`` per layer, summed over all batches (second pass over the data)."""
        backend, options = self._backend, self._build_options
        totals: dict[str, Array] = {}
        request = SignalRequest(
            tuple(self.layers), self.num_data, self.fisher_type, options["mc_samples"]
        )
        with backend.preserved_state():
            batches = self._data.sampled_batches("EKFAC eigenvalues", options["seed"])
            for batch, rng in batches:
                corrections = backend.kronecker_eigencorrections(batch, request, rng, bases)
                for name, value in corrections.items():
                    totals[name] = totals.get(name, 0) + value
        return {name: self._data.combine(value) for name, value in totals.items()}


def _block_diagonal(first: Array, second: Array) -> Array:
    """Return ``[[Q₁, 0], [0, Q₂]]``: the eigenbasis of a separated layer's augmented input."""
    return get_library_fns(first.dtype).block_diag(first, second)
