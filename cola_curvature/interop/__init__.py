r"""KFAC's Kronecker factors to and from curvlinops 3 and laplace-torch 0.3.

Conventions, ours against theirs:

- **Kronecker order and vec.** A weight ``W`` of shape ``(out, in)``, a ``Conv2d`` weight
  ``(out, c_in, k₁, k₂)`` viewed as ``(out, c_in·k₁·k₂)`` (torch's ``unfold`` order), has
  the block ``G ⊗ A`` on the row-major ``vec(W) = W.flatten()``:
  ``(G ⊗ A) vec(W) = vec(G W A)`` with ``G`` (``out × out``) the output-gradient factor and
  ``A`` the input factor. curvlinops stores ``A`` as ``_input_covariances[name]`` and ``G``
  as ``_gradient_covariances[name]`` and multiplies ``G W A`` (its docstring's
  column-stacking ``A ⊗ G`` is the same matrix); a laplace-torch group ``[G, A]`` is
  ``kron(G, A)`` on ``W.flatten()``. The factors are copied, never transposed.
- **Weight and bias.** Joint: one block ``G ⊗ Ã`` on the row-major ``vec([W b])`` (the bias
  as last column), ``Ã`` the input factor of ``[a, 1]``. Separate: ``G ⊗ A`` on ``vec(W)``
  and ``G`` on ``b``, the same ``G``. Ours: ``KFAC(separate_weight_and_bias=...)``, joint by
  default; curvlinops: its flag, separate by default; laplace-torch: always separate, one
  group per parameter tensor in ``params`` order (``[G, A]`` for a weight, ``[G]`` for a
  bias).
- **Scaling.** Ours and curvlinops' are the same numbers: ``A = (1/(N T)) Σ ã ãᵀ`` over
  ``N`` examples and ``T`` shared positions, ``G = R Σ g gᵀ`` with ``g`` the gradients of
  the per-term losses and ``R`` the reduction (``1`` for ``"sum"``, ``1/(N T_ℓ)`` for
  ``"mean"``, ``T_ℓ`` the loss terms per example as torch's mean counts them: output
  entries for ``MSELoss``, positions for cross-entropy). laplace-torch's ``Kron`` is the
  KFAC of the summed unit-variance negative log-likelihood ``s Σ_n ℓ_n`` (``s = 1/2`` for
  ``MSELoss``, whose ``Σ (f - y)²`` is twice the Gaussian NLL; ``s = 1`` for
  cross-entropy): ``G`` summed over examples, ``A`` averaged, and ``s`` split over a
  weight's two factors as its ``Kron.__mul__`` does. Hence ``H_laplace = (s / R) K_ours``,
  factor by factor ``G_lap = (√s / R) G``, ``A_lap = √s A`` for a weight and
  ``G_lap = (s / R) G`` for a bias: the factors ``KronLaplace(backend=CurvlinopsGGN)``
  fits itself (cross-entropy with mean reduction: ``H_laplace = N T K_ours``).

Only ``Linear`` and ``Conv2d`` layers (torch ``F.linear`` / ``F.conv2d`` calls) travel:
the layers curvlinops supports, and the ones whose block is on a parameter's own row-major
entries. Embedding, shared-weight and uncovered blocks raise ``ValueError``; EKFAC's
eigen-corrected blocks, which have no factors, raise ``TypeError``. curvlinops and
laplace-torch are imported on first use.
"""

from cola_curvature.interop.curvlinops_kfac import from_curvlinops, to_curvlinops
from cola_curvature.interop.laplace_kron import from_laplace_kron, to_laplace_kron

__all__ = ["from_curvlinops", "from_laplace_kron", "to_curvlinops", "to_laplace_kron"]
