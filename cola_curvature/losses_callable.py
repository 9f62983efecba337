"""Any loss given as a function ``fn(outputs, targets)``, differentiated by autodiff."""

from __future__ import annotations

import math

from cola.backends import get_library_fns

from cola_curvature._loss_backend import LossFunction, loss_gradient, loss_hessian_products
from cola_curvature._tracing import is_abstract
from cola_curvature.losses import Array, Loss, RandomSource, Reduction, required_targets

#: Eigenvalues of an output Hessian down to ``-PSD_TOLERANCE · ε · max |λ|`` (``ε`` the
#: machine epsilon of the outputs' dtype, ``max`` over the batch) count as rounding errors
#: of a PSD matrix and are set to zero; anything more negative is an indefinite Hessian.
PSD_TOLERANCE = 100.0


class CallableLoss(Loss):
    r"""A loss ``fn(f, y)`` of the backend's arrays; gradient and output Hessian by autodiff.

    Convention: ``fn(f, y)`` returns the loss *summed* over the batch (torch's
    ``reduction="sum"``), as a scalar or as an array of per-example or per-term values
    whose sum is that; it must never average (the ``reduction`` here scales). Every term
    of example ``n`` depends on ``f_n`` and ``y_n`` only. ``"mean"`` divides by
    ``N · terms_per_example``, by default ``numel(f_n)`` as torch's ``"mean"`` of an
    element-wise loss; pass ``terms_per_example=1`` for one term per example (e.g. a
    cross-entropy over logits ``(N, C)``).

    The output Hessian ``H_n = ∇²_{f_n} ℓ`` of each example is built from ``C = numel(f_n)``
    Hessian-vector products of ``Σ fn`` (double backward in torch, ``jvp`` of ``grad`` in
    JAX), symmetrized and eigendecomposed, ``H_n = V diag(λ) Vᵀ``. The GGN needs it PSD:
    eigenvalues in ``[-τ, 0)`` (``τ`` from :data:`PSD_TOLERANCE`) are set to zero and a
    more negative one raises ``ValueError`` (under ``jax.jit``, where nothing can raise,
    that example's Hessian becomes NaN). Both :meth:`hessian_matmat` and
    :meth:`hessian_sqrt` use ``S = V diag(√λ₊)``, ``S Sᵀ = H``. Cost per batch: ``C``
    backward passes through ``fn`` and ``N`` eigendecompositions of ``C × C``, memory
    ``N C²``: for large outputs write a :class:`~cola_curvature.losses.Loss` subclass.

    Monte-Carlo Fisher needs ``likelihood``: a loss object whose ``sample`` draws the
    targets; ``fn`` must then be ``-log q(y | f)`` of that distribution (up to a constant),
    e.g. ``likelihood=GaussianNLL(var=1.0)`` for ``fn = ½ Σ (f - y)²``.

    Args:
        fn: ``fn(outputs, targets)``, the summed loss (see above).
        reduction: ``"sum"`` or ``"mean"``.
        terms_per_example: the ``"mean"`` divisor per example; default ``numel(f_n)``.
        likelihood: a :class:`~cola_curvature.losses.Loss` to sample targets from.
    """

    def __init__(
        self,
        fn: LossFunction,
        reduction: str | Reduction = "mean",
        terms_per_example: int | None = None,
        likelihood: Loss | None = None,
    ) -> None:
        super().__init__(reduction)
        if not callable(fn):
            raise TypeError(f"CallableLoss needs a callable fn(outputs, targets), got {fn!r}.")
        if terms_per_example is not None and not (
            isinstance(terms_per_example, int) and terms_per_example > 0
        ):
            raise ValueError(
                f"terms_per_example must be a positive int, got {terms_per_example!r}."
            )
        if likelihood is not None and not isinstance(likelihood, Loss):
            raise TypeError(
                f"likelihood must be a cola_curvature.losses object (e.g. GaussianNLL(var=1.0)), "
                f"got {type(likelihood).__name__}."
            )
        self.fn = fn
        self.terms = terms_per_example
        self.likelihood = likelihood

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        return f"CallableLoss({name}, reduction={self.reduction.value!r})"

    def terms_per_example(self, f: Array) -> int:
        """Return ``terms_per_example`` if given, else ``numel(f_n)``."""
        return math.prod(f.shape[1:]) if self.terms is None else self.terms

    def sum_value(self, f: Array, y: Array) -> Array:
        """Return ``Σ fn(f, y)``."""
        return self.fn(f, y).sum()

    def output_gradient(self, f: Array, y: Array) -> Array:
        """Return ``∇_f Σ fn(f, y)`` by reverse-mode autodiff."""
        return loss_gradient(self.fn, f, y)

    def _factor(self, f: Array, y: Array | None) -> Array:
        """Return ``S_n = V_n diag(√λ₊)`` per example, shape ``(N, C, C)``, at the targets ``y``."""
        xnp = get_library_fns(f.dtype)
        num_examples, size = f.shape[0], math.prod(f.shape[1:])
        eye = xnp.eye(size, size, dtype=f.dtype, device=xnp.get_device(f))
        tangents = eye.reshape((size, 1) + tuple(f.shape[1:])) + 0 * f[None]
        columns = loss_hessian_products(self.fn, f, required_targets(self, y), tangents)
        transposed = xnp.moveaxis(columns.reshape(size, num_examples, size), 1, 0)
        hessians = (transposed + xnp.moveaxis(transposed, 1, 2)) / 2
        eigenvalues, vectors = xnp.eigh(hessians)
        tolerance = PSD_TOLERANCE * xnp.finfo(f.dtype).eps * xnp.abs(eigenvalues).max()
        smallest = -xnp.max(-eigenvalues, -1)
        indefinite = smallest < -tolerance
        if not is_abstract(indefinite):
            if bool(indefinite.any()):
                n = int(xnp.argmax(xnp.cast(indefinite, xnp.int32), 0))
                raise ValueError(
                    f"the output Hessian of {self!r} is indefinite: example {n} has eigenvalue "
                    f"{float(smallest[n]):.3e} (largest |λ| in the batch "
                    f"{float(xnp.abs(eigenvalues).max()):.3e}); the GGN and its factors "
                    "need a convex loss in the outputs (e.g. a variance predicted by the model "
                    "makes a Gaussian NLL indefinite)."
                )
        else:
            eigenvalues = xnp.where(indefinite[:, None], eigenvalues * math.nan, eigenvalues)
        return vectors * xnp.sqrt(xnp.maximum(eigenvalues, 0 * eigenvalues))[:, None, :]

    def hessian_matmat(self, f: Array, u: Array, y: Array | None = None) -> Array:
        """Return ``S_n (S_nᵀ u_n) = H_n u_n`` per example for ``u`` of shape ``(k, *f.shape)``."""
        xnp = get_library_fns(f.dtype)
        factor = self._factor(f, y)
        flat = xnp.moveaxis(u.reshape(u.shape[0], f.shape[0], -1), 0, 2)
        products = factor @ (xnp.moveaxis(factor, 1, 2) @ flat)
        return xnp.moveaxis(products, 2, 0).reshape(u.shape)

    def hessian_sqrt(self, f: Array, y: Array | None = None) -> Array:
        """Return ``S[k, n] = column k of S_n``, shape ``(numel(f_n), *f.shape)``."""
        factor = get_library_fns(f.dtype).moveaxis(self._factor(f, y), 2, 0)
        return factor.reshape((factor.shape[0],) + tuple(f.shape))

    def sample(self, f: Array, rng: RandomSource, num_samples: int) -> Array:
        """Draw targets from ``likelihood``; raise ``ValueError`` when none was named."""
        if self.likelihood is None:
            raise ValueError(
                f"{self!r} has no likelihood to sample targets from, so it has no Monte-Carlo "
                "Fisher (FisherMC, fisher_type='mc'): pass likelihood=... (a cc.losses "
                "object whose negative log-likelihood fn is), or use GGN / the empirical Fisher."
            )
        return self.likelihood.sample(f, rng, num_samples)

    def check_target(self, f: Array, y: Array) -> None:
        """Require one target per example (and the likelihood's target format, if named)."""
        if y.shape[0] != f.shape[0]:
            raise ValueError(
                f"CallableLoss got {f.shape[0]} outputs but {y.shape[0]} targets in a batch."
            )
        if self.likelihood is not None:
            self.likelihood.check_target(f, y)
