"""Laplace approximation of the posterior over parameters on a structured curvature operator."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import cola
from cola.annotations import PSD
from cola.backends import get_library_fns
from tqdm import trange

from cola_curvature._tracing import is_traced
from cola_curvature.algorithms import SLQ
from cola_curvature.backends import curvature_backend
from cola_curvature.estimators import SpectralQuadrature
from cola_curvature.losses import MSE, BCEWithLogits, Reduction
from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.diagonal import DiagonalCurvature
from cola_curvature.operators.ekfac import EKFAC
from cola_curvature.operators.ggn import GGN
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker import KroneckerBlock, KroneckerFactored
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.shifted import ShiftedCurvature
from cola_curvature.operators.symmetry import SymmetryCurvature

Array = Any

CURVATURES = ("kfac", "ekfac", "diag", "full", "ggn", "lowrank", "symmetry")


def _all_positive(value: Any) -> bool:
    """Return whether a number, or every entry of an array or sequence, is ``> 0``."""
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, (list, tuple)):
        return all(_all_positive(v) for v in value)
    return bool((value > 0).all())


class Laplace:
    r"""Laplace posterior ``q(θ) = N(θ*, P⁻¹)`` around a MAP estimate ``θ*`` (MacKay, 1992).

    The posterior precision is ``P = H / (σ² T) + δ I`` where ``H`` is the GGN of the
    unit-variance negative log-likelihood summed over the data (for ``MSELoss`` half the
    GGN of ``Σ (f - y)²``; for cross-entropy the GGN itself), ``σ`` the observation noise
    (regression only), ``T`` the temperature and ``δ`` the prior precision of the prior
    ``N(0, δ⁻¹ I)``. ``P`` stays a Kronecker-factored CoLA operator, so ``logdet(P)``,
    ``P⁻¹ v`` and ``P^{-1/2} z`` are exact and structured (the dispatch rules).

    Curvatures: ``"kfac"`` and ``"ekfac"`` (type-2 statistics), ``"diag"`` (the exact
    diagonal of the GGN, :class:`~cola_curvature.DiagonalCurvature`), ``"full"`` (the exact GGN
    as one dense block, ``O(D²)`` memory and ``D`` GGN products to build: small models
    only), any PSD matrix-free operator (treated like ``"ggn"``), or any
    :class:`~cola_curvature.KroneckerFactored` operator the user built for
    the same ``params`` on the summed unit-variance NLL. ``"ggn"`` keeps the exact GGN
    matrix-free: ``P = c G + δ I`` is a :class:`~cola_curvature.ShiftedCurvature`,
    predictives solve with CG, and ``logdet P`` comes from one quadrature rule of ``G``
    computed once: since the rule of ``c G + δ I`` has nodes ``c θ + δ``, every later
    evaluation of the evidence (and its gradient in ``δ`` and ``σ``) costs no product with
    ``G``. With ``slq=None`` and ``D`` at most the default SLQ budget (``20 × 30 = 600``
    product columns), the rule is exact (all eigenvalues of ``G``, ``D`` product columns);
    otherwise it is *stochastic* (Lanczos quadrature, ``slq``, default ``cc.SLQ()``), and
    :meth:`log_det_standard_error` gives its standard error over the probes. ``sample``
    applies ``P^{-1/2}`` by Lanczos (:class:`~cola_curvature.LanczosFunction`).
    ``"lowrank"``: ``U diag(s) Uᵀ + diag(d)`` with the top-``rank``
    eigenpairs of the GGN (Lanczos) and ``d`` the rest of its exact diagonal (clipped at 0),
    a :class:`~cola_curvature.DiagonalPlusLowRank`: inverse by Woodbury, logdet by
    Sylvester's identity and samples through an exact factor, all ``O(D k²)``.
    ``"symmetry"``: the outer product of the gradient of the summed NLL at ``θ*``, averaged
    over the weight-space symmetries ``symmetry_groups``
    (:class:`~cola_curvature.SymmetryCurvature`) — a curvature proxy from one gradient;
    at an exact optimum of the likelihood alone that gradient vanishes, so it is
    informative only where the prior keeps ``θ*`` away from it.

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
    """

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        curvature: str | KroneckerFactored | CurvatureOperator = "kfac",
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        slq: SLQ | None = None,
        rank: int = 10,
        symmetry_groups: Any = "orthogonal-rows",
        distributed: bool = False,
        uncovered: str = "error",
    ) -> None:
        backend = curvature_backend(model, loss_func, params)
        loss = type(backend.loss)(Reduction.SUM)
        self.regression = isinstance(loss, MSE)
        if not self.regression and sigma_noise != 1.0:
            raise ValueError("sigma_noise applies to regression (MSELoss) only; leave it at 1.")
        for name, value in [
            ("prior_precision", prior_precision),
            ("sigma_noise", sigma_noise),
            ("temperature", temperature),
        ]:
            if not _all_positive(value):
                raise ValueError(f"{name} must be positive, got {value}.")
        self._backend = backend
        self._loss = loss
        self._data = data
        self.params = params
        self.temperature = temperature
        # MSELoss('sum') is Σ (f - y)², twice the unit-variance Gaussian NLL.
        self._nll_scale = 0.5 if self.regression else 1.0
        # matrix-free curvatures keep their own scaling: the GGN of the loss for "ggn",
        # a user's operator as given (already of the unit-variance NLL)
        self._matrix_free_scale = self._nll_scale if curvature == "ggn" else 1.0
        self._slq = slq
        self._quadrature: SpectralQuadrature | None = None
        self._spectrum: tuple[list[Array], Array] | None = None
        self._block_norms: list[Array] | None = None
        self._rank = rank
        self._symmetry_groups = symmetry_groups
        self.distributed = distributed
        self._uncovered = uncovered
        self.curvature = self._build_curvature(model, params, data, curvature)
        xnp = self.curvature.xnp
        self.prior_precision = xnp.array(
            prior_precision, dtype=self.curvature.dtype, device=self.curvature.device
        )
        self._check_prior_shape(self.prior_precision)
        self.sigma_noise = xnp.array(
            sigma_noise, dtype=self.curvature.dtype, device=self.curvature.device
        )
        self._mean = backend.parameter_vector()
        self._mean_squared_norm = (self._mean**2).sum()
        self._nll, self._num_outputs = self._negative_log_likelihood_terms()

    def _build_curvature(
        self, model: Any, params: Any, data: Any, curvature: str | KroneckerFactored
    ) -> KroneckerFactored | CurvatureOperator:
        """Return ``H``: the GGN of the summed unit-variance NLL (``"ggn"``: of the loss)."""
        if isinstance(curvature, (KroneckerFactored, CurvatureOperator)):
            if curvature.shape[0] != self._backend.num_params:
                raise ValueError(
                    f"curvature has shape {curvature.shape}; params have "
                    f"{self._backend.num_params} entries."
                )
            if isinstance(curvature, CurvatureOperator) and not curvature.isa(PSD):
                raise ValueError(
                    f"a matrix-free curvature must be PSD (GGN, FisherMC, EmpiricalFisher); "
                    f"{type(curvature).__name__} is not, and log det P would be undefined."
                )
            return curvature
        if curvature not in CURVATURES:
            raise ValueError(
                f"Unsupported curvature {curvature!r}; expected one of {CURVATURES} or a "
                "KroneckerFactored operator."
            )
        nll_scale = self._nll_scale
        if curvature == "ggn":
            return GGN(model, self._loss, params, data, distributed=self.distributed)
        if curvature == "symmetry":
            # ∇ NLL = (NLL scale) ∇ loss, so the averaged outer product scales by its square
            symmetric = SymmetryCurvature(
                model,
                self._loss,
                params,
                data,
                groups=self._symmetry_groups,
                distributed=self.distributed,
            )
            return symmetric.scaled(nll_scale**2)
        if curvature == "lowrank":
            return self._low_rank_curvature(model, params, data).scaled(nll_scale)
        if curvature == "full":
            dense = GGN(model, self._loss, params, data, distributed=self.distributed).to_dense()
            xnp = get_library_fns(dense.dtype)
            one = xnp.ones((1, 1), dtype=dense.dtype, device=xnp.get_device(dense))
            identity = xnp.arange(dense.shape[0], device=xnp.get_device(dense))
            return KroneckerFactored([KroneckerBlock(nll_scale * dense, one)], identity)
        if curvature == "diag":
            return DiagonalCurvature(
                model, self._loss, params, data, fisher_type="type-2", distributed=self.distributed
            ).scaled(nll_scale)
        operator_type = {"kfac": KFAC, "ekfac": EKFAC}[curvature]
        return operator_type(
            model,
            self._loss,
            params,
            data,
            fisher_type="type-2",
            uncovered=self._uncovered,
            distributed=self.distributed,
        ).scaled(nll_scale)

    def _low_rank_curvature(self, model: Any, params: Any, data: Any) -> DiagonalPlusLowRank:
        """Return ``U diag(s) Uᵀ + diag(max(diag G − diag(U diag(s) Uᵀ), 0))`` of the GGN."""
        ggn = GGN(model, self._loss, params, data, distributed=self.distributed)
        if not 0 < self._rank <= ggn.shape[0]:
            raise ValueError(f"rank must be in 1..{ggn.shape[0]}, got {self._rank}.")
        values, vectors = cola.linalg.eig(ggn, self._rank, "LA")
        U = vectors.to_dense()
        exact = DiagonalCurvature(
            model, self._loss, params, data, fisher_type="type-2", distributed=self.distributed
        )
        xnp = ggn.xnp
        rest = exact.diagonal() - ((U**2) * values).sum(1)
        M = xnp.diag(values)
        return DiagonalPlusLowRank(xnp.maximum(rest, 0 * rest), U, M, {PSD})

    def _negative_log_likelihood_terms(self) -> tuple[Array, int]:
        """Return ``Σ ℓ(f(x_n), y_n)`` at ``θ*`` (the loss's own sum) and the output count."""
        total, count = 0, 0
        for inputs, targets in self._data:
            self._input_shape = tuple(getattr(inputs, "shape", ())[1:])
            outputs = self._backend.forward(inputs)
            self._loss.check_target(outputs, targets)
            total = total + self._loss.sum_value(outputs, targets)
            count += math.prod(outputs.shape)
        if self.distributed:
            total = self._backend.sum_over_processes(total)
            count = sum(self._backend.gather_counts(count))
        return total, count

    def _resolve(self, prior_precision: Any, sigma_noise: Any) -> tuple[Array, Array]:
        """Return the given hyperparameters, or the stored ones where ``None``.

        Raises:
            ValueError: when a given value is known to be ``≤ 0``.
        """
        for name, value in [("prior_precision", prior_precision), ("sigma_noise", sigma_noise)]:
            if value is not None and not is_traced(value) and not _all_positive(value):
                raise ValueError(f"{name} must be positive, got {value}.")
        return (
            self.prior_precision if prior_precision is None else prior_precision,
            self.sigma_noise if sigma_noise is None else sigma_noise,
        )

    def _check_prior_shape(self, delta: Array) -> None:
        """Raise unless ``δ`` is a scalar, or one value per block of a Kronecker curvature."""
        if getattr(delta, "ndim", 0) == 0:
            return
        blocks = getattr(self.curvature, "blocks", None)
        if not isinstance(self.curvature, KroneckerFactored) or delta.shape != (len(blocks),):
            count = f"{len(blocks)} blocks" if blocks is not None else "no blocks"
            raise ValueError(
                f"prior_precision has shape {tuple(delta.shape)}; a per-layer prior needs a "
                f"Kronecker-factored curvature ('kfac', 'ekfac': one block per layer) and one "
                f"value per block (this curvature has {count})."
            )

    def _block_sizes(self) -> list[int]:
        """Return the sizes of the curvature's blocks (block order)."""
        return [block.shape[0] for block in self.curvature.blocks]

    def _prior_terms(self, delta: Array) -> tuple[Array, Array]:
        """Return ``Σ_b δ_b ‖θ*_b‖²`` and ``log det(prior) = Σ_b n_b log δ_b``."""
        xnp = self.curvature.xnp
        if getattr(delta, "ndim", 0) == 0:
            scatter = delta * self._mean_squared_norm
            return scatter, self._mean.shape[0] * xnp.log(delta + 0 * scatter)
        scatter, log_det = 0, 0
        for value, size, norm in zip(
            delta, self._block_sizes(), self._block_squared_norms(), strict=True
        ):
            scatter = scatter + value * norm
            log_det = log_det + size * xnp.log(value)
        return scatter, log_det

    def _block_squared_norms(self) -> list[Array]:
        """Return ``‖θ*_b‖²`` per block of a Kronecker-factored curvature (computed once)."""
        if self._block_norms is None:
            in_blocks = self._mean[self.curvature.permutation]
            offsets = [0, *itertools.accumulate(self._block_sizes())]
            self._block_norms = [
                (in_blocks[start:stop] ** 2).sum() for start, stop in itertools.pairwise(offsets)
            ]
        return self._block_norms

    @property
    def matrix_free(self) -> bool:
        """Whether the curvature is matrix-free (``"ggn"``, or an operator such as a Fisher)."""
        return isinstance(self.curvature, CurvatureOperator)

    def posterior_precision(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> KroneckerFactored | DiagonalPlusLowRank | ShiftedCurvature:
        """Return ``P = H / (σ² T) + δ I``, Kronecker-factored or (``"ggn"``) shifted."""
        delta, sigma = self._resolve(prior_precision, sigma_noise)
        if self.matrix_free:
            scale = self._matrix_free_scale / (sigma**2 * self.temperature)
            return ShiftedCurvature(self.curvature, delta, scale)
        scaled = self.curvature.scaled(1 / (sigma**2 * self.temperature))
        if getattr(delta, "ndim", 0) == 0:
            return scaled.damped(delta)
        self._check_prior_shape(delta)
        return scaled.damped_per_block(delta)

    def _curvature_spectrum(self) -> tuple[list[Array], Array]:
        """Return the Kronecker-factored ``H``'s eigenvalues per block and all together.

        Computed on the first call and kept: every later evidence evaluation and gradient
        reuses them.
        """
        if self._spectrum is None:
            per_block = [block.spectrum() for block in self.curvature.blocks]
            self._spectrum = (per_block, self.curvature.xnp.concat(per_block))
        return self._spectrum

    def log_det_posterior_precision(
        self, prior_precision: Any = None, sigma_noise: Any = None
    ) -> Array:
        """Return ``logdet P``: exact from the structure, or by the cached SLQ for ``"ggn"``.

        Kronecker-factored curvatures keep their blocks' eigenvalues from the first call on,
        so later evaluations (every step of :meth:`optimize_prior_precision`) cost ``O(D)``.
        """
        delta, sigma = self._resolve(prior_precision, sigma_noise)
        scale = 1 / (sigma**2 * self.temperature)
        if isinstance(self.curvature, KroneckerFactored):
            # logdet P = Σ_b Σ log(λ_b / (σ² T) + δ_b) from the cached eigenvalues λ_b
            xnp = self.curvature.xnp
            per_block, everything = self._curvature_spectrum()
            if not getattr(delta, "ndim", 0):
                return xnp.log(scale * everything + delta).sum()
            return sum(
                xnp.log(scale * values + shift).sum()
                for values, shift in zip(per_block, delta, strict=True)
            )
        if not self.matrix_free:
            return cola.linalg.logdet(self.posterior_precision(delta, sigma))
        xnp = self.curvature.xnp
        return self._curvature_quadrature().trace(self._log_posterior_eigenvalue(delta, sigma), xnp)

    def log_det_standard_error(self, prior_precision: Any = None, sigma_noise: Any = None) -> Array:
        """Return the standard error of :meth:`log_det_posterior_precision` (``0`` if exact).

        Nonzero only for a matrix-free curvature whose log-determinant is estimated by SLQ
        (``D > 600`` or an explicit ``slq``): the spread over the probes, ``/ √p``. The
        evidence carries half of it.
        """
        delta, sigma = self._resolve(prior_precision, sigma_noise)
        xnp = self.curvature.xnp
        if not self.matrix_free:
            return xnp.array(0.0, dtype=self.curvature.dtype, device=self.curvature.device)
        quadrature = self._curvature_quadrature()
        return quadrature.standard_error(self._log_posterior_eigenvalue(delta, sigma), xnp)

    def _log_posterior_eigenvalue(self, delta: Array, sigma: Array) -> Callable[[Array], Array]:
        """Return ``θ ↦ log(c θ + δ)``: an eigenvalue of ``H`` to one of ``log P``."""
        xnp = self.curvature.xnp
        scale = self._matrix_free_scale / (sigma**2 * self.temperature)
        return lambda nodes: xnp.log(scale * nodes + delta)

    def _curvature_quadrature(self) -> SpectralQuadrature:
        """Return the cached quadrature rule of the matrix-free ``H`` (exact when small)."""
        if self._quadrature is None:
            budget = SLQ()
            exact = self._slq is None and self.curvature.shape[0] <= (
                budget.num_probes * budget.num_steps
            )
            self._quadrature = (
                SpectralQuadrature.exact(self.curvature)
                if exact
                else SpectralQuadrature.of(self.curvature, self._slq or budget)
            )
        return self._quadrature

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

        ``log p(D) ≈ log p(D|θ*) - ½ δ ‖θ*‖² + ½ D log δ - ½ logdet P``; ``logdet P`` comes
        from the factors' eigenvalues (SLQ for ``"ggn"``). Differentiable in ``δ`` and ``σ``
        (pass tensors that require grad, or JAX arrays under ``jax.grad``).
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
        variables = [xnp.log(self.prior_precision), xnp.log(self.sigma_noise)]
        tuned = [True, tune_sigma]

        def negative_evidence(log_delta: Array, log_sigma: Array) -> Array:
            return -self.log_marginal_likelihood(xnp.exp(log_delta), xnp.exp(log_sigma))

        first = [0 * v for v in variables]
        second = [0 * v for v in variables]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in trange(
            1,
            steps + 1,
            desc="marginal likelihood",
            disable=None if progressbar is None else not progressbar,
            leave=False,
        ):
            if isinstance(self.curvature, KroneckerFactored):
                grads = [
                    -g for g in self.evidence_gradient(xnp.exp(variables[0]), xnp.exp(variables[1]))
                ]
            else:
                _, grads = self._backend.value_and_grad(negative_evidence, variables)
            for i, grad in enumerate(grads):
                if not tuned[i]:
                    continue
                first[i] = beta1 * first[i] + (1 - beta1) * grad
                second[i] = beta2 * second[i] + (1 - beta2) * grad**2
                corrected = first[i] / (1 - beta1**step)
                scale = xnp.sqrt(second[i] / (1 - beta2**step)) + eps
                variables[i] = variables[i] - lr * corrected / scale
        self.prior_precision = xnp.exp(variables[0])
        self.sigma_noise = xnp.exp(variables[1])

    def evidence_gradient(self, prior_precision: Array, sigma_noise: Array) -> list[Array]:
        r"""Return ``∂E/∂ log δ`` and ``∂E/∂ log σ`` in closed form (Kronecker-factored ``H``).

        With ``H``'s eigenvalues ``λ`` (cached), ``c = 1/(σ² T)``, ``n`` outputs, ``m_b =
        ‖θ*_b‖²`` and ``n_b`` entries per prior block:
        ``∂E/∂ log δ_b = −½ δ_b m_b + ½ n_b − ½ Σ_{i∈b} δ_b / (c λ_i + δ_b)`` and, for
        regression with ``S = Σ (f − y)²``, ``∂E/∂ log σ = S/(σ² T) − n/T + Σ_i c λ_i /
        (c λ_i + δ)`` (zero for classification).
        """
        xnp = self.curvature.xnp
        spectra, everything = self._curvature_spectrum()
        scale = 1 / (sigma_noise**2 * self.temperature)
        per_block = getattr(prior_precision, "ndim", 0) > 0
        groups = spectra if per_block else [everything]
        deltas = prior_precision if per_block else [prior_precision]
        sizes = self._block_sizes() if per_block else [self._mean.shape[0]]
        norms = self._block_squared_norms() if per_block else [self._mean_squared_norm]
        d_delta, d_sigma = [], 0
        for values, delta, size, norm in zip(groups, deltas, sizes, norms, strict=True):
            denominators = scale * values + delta
            d_delta.append(-0.5 * delta * norm + 0.5 * size - 0.5 * (delta / denominators).sum())
            d_sigma = d_sigma + (scale * values / denominators).sum()
        d_log_delta = xnp.stack(d_delta) if per_block else d_delta[0]
        if not self.regression:
            return [d_log_delta, 0 * sigma_noise]
        likelihood = self._nll * scale - self._num_outputs / self.temperature
        return [d_log_delta, likelihood + d_sigma]

    def predictive(self, inputs: Any) -> tuple[Array, Array]:
        """Return the linearised (GLM) predictive mean ``f(x)`` and covariance ``J P⁻¹ Jᵀ``.

        Shapes: mean ``(N, C)``, covariance ``(N, C, C)`` of the function values (add
        ``σ²`` for the observation noise of regression). Outputs with more axes, e.g. a
        language model's logits ``(N, V, T)``, give the mean in that shape and the joint
        covariance ``(N, C, C)`` of each input's ``C = V T`` outputs flattened row-major
        (``reshape(N, -1)``). ``P⁻¹`` is applied to the ``N C``
        Jacobian rows through the structured inverse, never densely; only the per-input
        ``C × C`` blocks are formed (``O(N C D)`` memory). With ``"ggn"`` every row is a
        column of one batched CG solve: slow for many inputs.
        """
        shape = tuple(getattr(inputs, "shape", ())[1:])
        if self._input_shape and shape != self._input_shape:
            raise ValueError(
                f"inputs have shape {tuple(inputs.shape)}; the training inputs were "
                f"(N, {', '.join(map(str, self._input_shape))})."
            )
        outputs, jacobian = self._backend.output_jacobian(inputs)
        num_inputs, outputs_per_input = outputs.shape[0], math.prod(outputs.shape[1:])
        rows = jacobian.reshape(-1, jacobian.shape[-1])
        solved = cola.linalg.inv(self.posterior_precision()) @ rows.T
        per_input = rows.reshape(num_inputs, outputs_per_input, -1)
        columns = solved.T.reshape(num_inputs, outputs_per_input, -1)
        xnp = self.curvature.xnp
        return outputs, per_input @ xnp.moveaxis(columns, -1, -2)

    def predictive_probabilities(
        self, inputs: Any, method: str = "probit", num_samples: int = 100, seed: int = 0
    ) -> Array:
        """Return class probabilities of the GLM predictive (classification only).

        ``"probit"``: ``softmax(f / √(1 + π/8 · diag Σ_f))`` (MacKay, 1992), one pass.
        ``"mc"``: the average of ``softmax(f + L z)`` over ``num_samples`` draws
        ``z ~ N(0, I)``, ``L Lᵀ = Σ_f`` (a jitter of ``1e-10 · max diag`` keeps ``L`` real).
        For ``BCEWithLogits`` the sigmoid replaces the softmax. The result has the shape of
        the outputs; for outputs ``(N, C, d_1, …)`` (e.g. a language model's ``(N, V, T)``)
        the softmax runs over the class axis 1 at each position, and ``"mc"`` samples all of
        an input's outputs jointly.
        """
        if self.regression:
            raise ValueError("predictive_probabilities is for classification losses.")
        if method not in ("probit", "mc"):
            raise ValueError(f"method must be 'probit' or 'mc', got {method!r}.")
        mean, covariance = self.predictive(inputs)
        xnp = self.curvature.xnp

        def link(f: Array, class_axis: int) -> Array:
            if isinstance(self._loss, BCEWithLogits):
                return 1 / (1 + xnp.exp(-f))
            return xnp.softmax(f, axis=class_axis)

        if method == "probit":
            variances = xnp.stack([covariance[n].diagonal() for n in range(mean.shape[0])])
            return link(mean / xnp.sqrt(1 + math.pi / 8 * variances.reshape(mean.shape)), 1)
        size = covariance.shape[-1]
        jitter = (
            1e-10
            * xnp.abs(covariance).max()
            * xnp.eye(size, size, dtype=mean.dtype, device=self.curvature.device)
        )
        factor = xnp.cholesky(covariance + jitter)
        noise = self._backend.random(seed).normal((num_samples, mean.shape[0], size, 1), mean)
        samples = mean[None] + (factor[None] @ noise)[..., 0].reshape((num_samples, *mean.shape))
        return link(samples, 2).mean(0)

    def sample(self, num_samples: int, seed: int = 0) -> Array:
        """Return ``θ* + L z``, ``z ~ N(0, I)``, ``L Lᵀ = P⁻¹``, shape ``(D, num_samples)``.

        ``L = P^{-1/2}``: exact for the Kronecker-factored posteriors, by Lanczos for the
        matrix-free ones (``"ggn"``; all samples together, one product with
        ``num_samples`` columns per step); for ``"lowrank"`` the exact factor of
        :meth:`DiagonalPlusLowRank.inverse_factor`.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}.")
        like = self._mean[:1]
        noise = self._backend.random(seed).normal((self._mean.shape[0], num_samples), like)
        precision = self.posterior_precision()
        if isinstance(precision, DiagonalPlusLowRank):
            return self._mean[:, None] + precision.inverse_factor() @ noise
        return self._mean[:, None] + cola.linalg.isqrt(precision) @ noise
