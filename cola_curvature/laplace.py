"""Laplace approximation of the posterior over parameters on a structured curvature operator."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import cola

from cola_curvature._tracing import is_traced
from cola_curvature.laplace_curvatures import (
    CURVATURES,
    CurvatureRequest,
    build_curvature,
    logdet_algorithm,
)
from cola_curvature.laplace_evidence import (
    adam_descent,
    all_positive,
    block_sizes,
    block_squared_norms,
    check_prior_shape,
    closed_form_gradient,
    negative_log_likelihood,
    prior_terms,
)
from cola_curvature.laplace_predictive import PosteriorPredictive
from cola_curvature.laplace_subsets import index_array, select_parameters
from cola_curvature.losses import MSE, Reduction
from cola_curvature.matfree import SLQ
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators._bound import DataBound
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import ShiftedCurvature
from cola_curvature.options import (
    LaplaceCurvature,
    SubsetOfWeights,
    Uncovered,
)
from cola_curvature.types import Array
from dispatch_rules.logdet import shifted_quadrature

__all__ = ["CURVATURES", "Laplace"]


class Laplace(DataBound, PosteriorPredictive):
    r"""Laplace posterior ``q(θ) = N(θ*, P⁻¹)`` around a MAP estimate ``θ*`` (MacKay, 1992).

    The posterior precision is ``P = H / (σ² T) + δ I`` where ``H`` is the GGN of the
    unit-variance negative log-likelihood summed over the data (for ``MSELoss`` half the
    GGN of ``Σ (f - y)²``; for cross-entropy the GGN itself), ``σ`` the observation noise
    (regression only), ``T`` the temperature and ``δ`` the prior precision of the prior
    ``N(0, δ⁻¹ I)``. ``P`` is a CoLA operator of the same structure as ``H``, and
    ``logdet P``, ``P⁻¹ v`` and ``P^{-1/2} z`` are ``cola.linalg.logdet``, ``inv`` and
    ``isqrt`` of it: exact and structured, or matrix-free (the dispatch rules).

    Curvatures (:mod:`~cola_curvature.laplace_curvatures`): ``"kfac"``, ``"ekfac"``,
    ``"diag"``, ``"full"``, ``"symmetry"`` and a user's
    :class:`~cola_curvature.KroneckerFactored` operator are Kronecker-factored: everything
    exact. ``"lowrank"`` is a :class:`~cola_curvature.DiagonalPlusLowRank`: exact in
    ``O(D k²)``, samples through an exact factor ``L``, ``L Lᵀ = P⁻¹``. ``"ggn"`` (and a
    user's PSD matrix-free operator, e.g. ``cc.FisherMC`` of the summed NLL) keeps ``H``
    matrix-free: ``P = c G + δ I`` is a :class:`~cola_curvature.ShiftedCurvature`,
    predictives solve with CG, ``sample`` applies ``P^{-1/2}`` by Lanczos, and ``logdet P``
    re-weights one quadrature rule of ``G`` kept on ``G`` (nodes ``c θ + δ``), so every
    later evaluation of the evidence and its gradient in ``δ`` and ``σ`` costs no product
    with ``G``. With ``slq=None`` and ``D`` at most the default SLQ budget (``20 × 30 =
    600`` product columns) the rule is exact (all eigenvalues of ``G``); otherwise it is
    stochastic and :meth:`log_det_standard_error` gives its standard error.

    Subsets (``subset_of_weights``, named as in laplace-torch;
    :mod:`~cola_curvature.laplace_subsets`): the posterior is over a subset ``S`` of
    ``params``, the rest held at ``θ*``. ``"last_layer"``: laplace-torch's last
    ``nn.Linear`` wherever it finds one; ``"subnetwork"``: ``subnetwork`` is a list of
    tensors of ``params`` (every curvature applies) or an index set into the flattened
    ``params`` (integer indices or a boolean mask, laplace-torch's ``subnetwork_indices``),
    where only ``"full"`` (``E_Sᵀ G E_S``) and ``"diag"`` restrict to the entries.

    Args:
        model: The trained model (``θ*`` = the current values of ``params``).
        loss_func: ``MSELoss`` (regression), ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``
            (classification) or the matching :mod:`cola_curvature.losses` object; its
            reduction is ignored (the Laplace evidence needs the summed likelihood).
        params: The parameters the posterior is over.
        data: The training data, a re-iterable of ``(X, y)`` batches.
        curvature: ``"kfac"``, ``"ekfac"``, ``"diag"``, ``"full"``, ``"ggn"``,
            ``"lowrank"``, ``"symmetry"``, a ``KroneckerFactored`` operator, or a PSD
            matrix-free operator (e.g. ``cc.FisherMC`` of the summed NLL), used as ``H``.
        prior_precision: ``δ > 0``, or one value per block of a Kronecker-factored
            curvature (a per-layer prior ``⊕_b δ_b I``: KFAC and EKFAC have one block per
            layer, weight and bias together); :meth:`optimize_prior_precision` tunes each.
        sigma_noise: ``σ > 0``, observation noise of regression (must be 1 otherwise).
        temperature: ``T > 0``; ``T < 1`` sharpens the likelihood.
        slq: The quadrature of ``logdet`` for ``"ggn"``; ``None``: exact for ``D ≤ 600``,
            else ``cc.SLQ()``.
        rank: ``k`` of ``"lowrank"``.
        symmetry_groups: ``groups`` of :class:`~cola_curvature.SymmetryCurvature` for
            ``"symmetry"``.
        distributed: ``data`` is this rank's shard over a ``torch.distributed`` group; the
            curvature, the likelihood and the output count are summed over the ranks.
        uncovered: For ``"kfac"`` and ``"ekfac"``: what to do with parameters no
            supported layer owns, passed to :class:`~cola_curvature.KFAC` (``"error"``, the
            default, raises and names them; see its ``uncovered`` for the blocks it can
            build instead, e.g. for a transformer's embeddings and norms). Ignored by the
            other curvatures, which cover every parameter.
        separate_weight_and_bias: For ``"kfac"`` and ``"ekfac"``: a weight block and a bias
            block per layer (laplace-torch's ``kron``) instead of one joint block (the
            default); see :class:`~cola_curvature.KFAC`. A per-layer prior then has one
            value per block.
        subset_of_weights: ``"all"`` (default), ``"last_layer"`` or ``"subnetwork"``.
        subnetwork: For ``"subnetwork"``: tensors of ``params``, or indices / a mask into
            the flattened ``params``.
    """

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        curvature: str | LaplaceCurvature | KroneckerFactored | CurvatureOperator = "kfac",
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        slq: SLQ | None = None,
        rank: int = 10,
        symmetry_groups: Any = "orthogonal-rows",
        distributed: bool = False,
        uncovered: str | Uncovered = "error",
        separate_weight_and_bias: bool = False,
        subset_of_weights: str | SubsetOfWeights = "all",
        subnetwork: Any = None,
    ) -> None:
        self._bind(model, loss_func, params, data, distributed=distributed)
        selection = select_parameters(self._backend, model, data, subset_of_weights, subnetwork)
        if selection.leaves is not None:
            model, params = self._backend.parameter_subset(selection.leaves)
            self._bind(model, loss_func, params, self._data)
        backend = self._backend
        self.subset_of_weights = subset_of_weights
        loss = type(backend.loss)(Reduction.SUM)
        self.regression = isinstance(loss, MSE)
        if not self.regression and sigma_noise != 1.0:
            raise ValueError("sigma_noise applies to regression (MSELoss) only; leave it at 1.")
        for name, value in [
            ("prior_precision", prior_precision),
            ("sigma_noise", sigma_noise),
            ("temperature", temperature),
        ]:
            if not all_positive(value):
                raise ValueError(f"{name} must be positive, got {value}.")
        self._loss = loss
        self.params = params
        self.temperature = temperature
        self.distributed = distributed
        self._mean = backend.layout.vector()
        self._indices = (
            None if selection.indices is None else index_array(self._mean, selection.indices)
        )
        if self._indices is not None:
            self._mean = self._mean[self._indices]
        request = CurvatureRequest(
            model,
            loss,
            params,
            self._data,
            # MSELoss('sum') is Σ (f - y)², twice the unit-variance Gaussian NLL
            nll_scale=0.5 if self.regression else 1.0,
            indices=self._indices,
            rank=rank,
            symmetry_groups=symmetry_groups,
            uncovered=uncovered,
            separate_weight_and_bias=separate_weight_and_bias,
        )
        self.curvature = build_curvature(curvature, request, self._mean.shape[0])
        self._logdet_algorithm = logdet_algorithm(slq, self._mean.shape[0])
        self._spectrum: tuple[list[Array], Array] | None = None
        self._block_norms: list[Array] | None = None
        xnp = self.curvature.xnp
        self.prior_precision = xnp.array(
            prior_precision, dtype=self.curvature.dtype, device=self.curvature.device
        )
        check_prior_shape(self.prior_precision, self.curvature)
        self.sigma_noise = xnp.array(
            sigma_noise, dtype=self.curvature.dtype, device=self.curvature.device
        )
        self._mean_squared_norm = (self._mean**2).sum()
        self._nll, self._num_outputs, self._input_shape = negative_log_likelihood(
            backend, loss, self._data
        )

    @property
    def matrix_free(self) -> bool:
        """Whether the curvature is matrix-free (``"ggn"``, or an operator such as a Fisher)."""
        return isinstance(self.curvature, ShiftedCurvature)

    def posterior_precision(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> KroneckerFactored | DiagonalPlusLowRank | ShiftedCurvature:
        """Return ``P = H / (σ² T) + δ I`` (``H / (σ² T) + ⊕_b δ_b I`` per block), as ``H``."""
        delta, sigma = self._resolve(prior_precision, sigma_noise)
        scaled = self.curvature.scaled(1 / (sigma**2 * self.temperature))
        if getattr(delta, "ndim", 0) == 0:
            return scaled.damped(delta)
        check_prior_shape(delta, self.curvature)
        return scaled.damped_per_block(delta)

    def log_det_posterior_precision(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> Array:
        """Return ``logdet P``, ``cola.linalg.logdet`` of :meth:`posterior_precision`.

        Exact for the structured curvatures (Kronecker factors keep their eigenvalues from
        the first call on, so later evaluations cost ``O(D)``); by ``G``'s kept quadrature
        rule for a matrix-free one (exact up to ``D = 600`` unless ``slq`` is given).
        """
        precision = self.posterior_precision(prior_precision, sigma_noise)
        return cola.linalg.logdet(precision, self._logdet_algorithm)

    def log_det_standard_error(self, prior_precision: Any = None, sigma_noise: Any = None) -> Array:
        """Return the standard error of :meth:`log_det_posterior_precision` (``0`` if exact).

        Nonzero only for a matrix-free curvature whose log-determinant is estimated by SLQ
        (``D > 600`` or an explicit ``slq``): the spread over the probes, ``/ √p``. The
        evidence carries half of it.
        """
        precision = self.posterior_precision(prior_precision, sigma_noise)
        xnp = precision.xnp
        if not self.matrix_free:
            return xnp.array(0.0, dtype=precision.dtype, device=precision.device)
        rule = shifted_quadrature(precision, self._logdet_algorithm)
        return rule.standard_error(lambda nodes: xnp.log(xnp.abs(nodes)), xnp)

    def log_likelihood(self, sigma_noise: Any = None) -> Array:
        """Return ``log p(D | θ*)`` (tempered by ``1/T``), differentiable in ``σ``.

        Regression: ``-Σ (f - y)² / (2σ²) - (N C / 2) log(2π σ²)``; classification: minus
        the summed cross-entropy.
        """
        _, sigma = self._resolve(None, sigma_noise)
        if not self.regression:
            return -self._nll / self.temperature
        xnp = self.curvature.xnp
        normaliser = 0.5 * self._num_outputs * xnp.log(2 * math.pi * sigma**2)
        return -(self._nll / (2 * sigma**2) + normaliser) / self.temperature

    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> Array:
        r"""Return the Laplace evidence, exact for the chosen curvature.

        ``log p(D) ≈ log p(D|θ*) - ½ δ ‖θ*‖² + ½ D log δ - ½ logdet P``; ``logdet P`` as
        :meth:`log_det_posterior_precision`. Differentiable in ``δ`` and ``σ`` (pass
        tensors that require grad, or JAX arrays under ``jax.grad``).
        """
        delta, sigma = self._resolve(prior_precision, sigma_noise)
        scatter, log_prior_det = self._prior_terms(delta)
        log_posterior_det = self.log_det_posterior_precision(delta, sigma)
        return (
            self.log_likelihood(sigma)
            - 0.5 * scatter
            + 0.5 * log_prior_det
            - 0.5 * log_posterior_det
        )

    def optimize_prior_precision(
        self,
        steps: int = 100,
        lr: float = 0.1,
        sigma_noise: bool | None = None,
        progressbar: bool | None = None,
        method: str = "marglik",
    ) -> None:
        """Maximise the marginal likelihood over ``log δ`` (and ``log σ`` for regression).

        Adam (Kingma & Ba 2015, β = (0.9, 0.999)) on the log-hyperparameters for ``steps``
        steps; ``sigma_noise`` defaults to tuning ``σ`` for regression. Gradients: in closed
        form from the cached spectrum for Kronecker-factored curvatures
        (:meth:`evidence_gradient`), from the backend's autodiff otherwise.
        ``progressbar``: ``None`` shows one on a terminal only. Updates
        :attr:`prior_precision` and :attr:`sigma_noise`.
        """
        if method != "marglik":
            raise ValueError(f"method must be 'marglik' (the only one offered), got {method!r}.")
        tune_sigma = self.regression if sigma_noise is None else sigma_noise
        xnp = self.curvature.xnp

        def negative_evidence(log_delta: Array, log_sigma: Array) -> Array:
            return -self.log_marginal_likelihood(xnp.exp(log_delta), xnp.exp(log_sigma))

        def gradient(variables: list[Array]) -> list[Array]:
            if isinstance(self.curvature, KroneckerFactored):
                hyperparameters = [xnp.exp(v) for v in variables]
                return [-g for g in self.evidence_gradient(*hyperparameters)]
            return self._backend.value_and_grad(negative_evidence, variables)[1]

        variables = [xnp.log(self.prior_precision), xnp.log(self.sigma_noise)]
        variables = adam_descent(
            gradient, variables, [True, tune_sigma], steps, lr, progressbar, xnp
        )
        self.prior_precision = xnp.exp(variables[0])
        self.sigma_noise = xnp.exp(variables[1])

    def evidence_gradient(self, prior_precision: Array, sigma_noise: Array) -> list[Array]:
        r"""Return ``∂E/∂ log δ`` and ``∂E/∂ log σ`` in closed form (Kronecker-factored ``H``).

        From ``H``'s eigenvalues, computed once; the formulas are in
        :mod:`~cola_curvature.laplace_evidence` (``∂E/∂ log σ`` is zero for classification).
        """
        xnp = self.curvature.xnp
        if self._spectrum is None:
            per_block = [block.spectrum() for block in self.curvature.blocks]
            self._spectrum = (per_block, xnp.concat(per_block))
        per_block, everything = self._spectrum
        spectra = per_block if getattr(prior_precision, "ndim", 0) else [everything]
        scale = 1 / (sigma_noise**2 * self.temperature)
        d_log_delta, d_sigma = closed_form_gradient(
            spectra, prior_precision, scale, *self._prior_blocks(prior_precision), xnp
        )
        if not self.regression:
            return [d_log_delta, 0 * sigma_noise]
        likelihood = self._nll * scale - self._num_outputs / self.temperature
        return [d_log_delta, likelihood + d_sigma]

    def _resolve(self, prior_precision: Any, sigma_noise: Any) -> tuple[Array, Array]:
        """Return the given hyperparameters (Python numbers as arrays), else the stored ones.

        Raises:
            ValueError: when a given value is known to be ``≤ 0``.
        """
        for name, value in [("prior_precision", prior_precision), ("sigma_noise", sigma_noise)]:
            if value is not None and not is_traced(value) and not all_positive(value):
                raise ValueError(f"{name} must be positive, got {value}.")
        curvature = self.curvature

        def as_array(value: Any, stored: Array) -> Array:
            if value is None:
                return stored
            if isinstance(value, (int, float, list, tuple)):
                return curvature.xnp.array(value, dtype=curvature.dtype, device=curvature.device)
            return value

        return as_array(prior_precision, self.prior_precision), as_array(
            sigma_noise, self.sigma_noise
        )

    def _prior_blocks(self, delta: Array) -> tuple[list[int], list[Array]]:
        """Return the prior's block sizes ``n_b`` and ``‖θ*_b‖²`` (one block for a scalar ``δ``)."""
        if getattr(delta, "ndim", 0) == 0:
            return [self._mean.shape[0]], [self._mean_squared_norm]
        if self._block_norms is None:
            self._block_norms = block_squared_norms(self._mean, self.curvature)
        return block_sizes(self.curvature), self._block_norms

    def _prior_terms(self, delta: Array) -> tuple[Array, Array]:
        """Return ``Σ_b δ_b ‖θ*_b‖²`` and ``log det(prior) = Σ_b n_b log δ_b``."""
        return prior_terms(delta, *self._prior_blocks(delta), self.curvature.xnp)
