"""Shared plumbing of the matrix-free curvature operators: data, scaling, checks, formats."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

from cola.annotations import SelfAdjoint
from cola.ops import LinearOperator

from cola_curvature._checks import NONDETERMINISM_CAUSES
from cola_curvature._tracing import is_abstract
from cola_curvature.operators._bound import DataBound
from cola_curvature.operators._interface import ParameterSpaceInterface
from cola_curvature.operators._operator_init import init_operator
from cola_curvature.types import Array


class CurvatureOperator(DataBound, ParameterSpaceInterface, LinearOperator):
    """A ``(D, D)`` curvature matrix of the empirical risk ``L(θ) = R Σ_n ℓ(f_θ(x_n), y_n)``.

    Subclasses implement :meth:`_batch_matmat`, one batch's contribution to the product
    (with the risk scaling ``R`` for the whole data set); this class owns the loop over
    batches, the input formats and the checks of the operator contract.

    Args:
        model: A ``torch.nn.Module`` (its parameters outside ``params`` stay fixed), a
            JAX ``model_fn(params, x) -> outputs``, or a flax linen / flax nnx / equinox
            module (see :mod:`cola_curvature.backends.jax.adapters`).
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss`` or a
            :mod:`cola_curvature.losses` descriptor (the only choice for JAX), with
            ``reduction`` ``"sum"`` or ``"mean"``.
        params: torch: the parameters the curvature is taken with respect to (any subset
            of the model's, in any order); JAX: the pytree ``model_fn`` takes, flattened
            in ``jax.flatten_util.ravel_pytree`` order; flax linen: the variables
            ``module.init`` returned; flax nnx: a filter (``None`` = ``nnx.Param``);
            equinox: a filter spec (``None`` = inexact arrays). ``D`` is their number of
            entries.
        data: A re-iterable of ``(X, y)`` batches, e.g. a list or a ``DataLoader``.
        check_deterministic: Verify at construction that data, model and products are
            deterministic (a second pass over the data beside the counting pass, two
            forward passes, two products; identical results).
            Needs values: pass ``False`` when building the operator inside ``jax.jit``.
        compile: torch: run each batch's product through ``torch.compile`` (see
            :mod:`~cola_curvature.backends.torch.compiled`): one program per operator,
            column count and batch shape, compiled on first use (tens of seconds; with
            ``check_deterministic`` that is at construction), after which products run
            up to 1.6 times faster (Hessian on the benchmark MLP, CNN and transformer; the
            Gauss-Newton types only on the transformer, see the README); off by default
            since the compile time outweighs that for a few hundred products or fewer.
            Raises ``NotImplementedError`` for models with custom ``autograd.Function``s and
            models ``torch.func`` or the compiler cannot handle; operators without a
            compiled route (``FisherMC``, ``GradientMoments``) refuse the option. JAX:
            accepted and changes nothing (products are always ``jax.jit``-compiled).
        **data_options: ``num_data``, ``batch_size_fn``, ``progressbar`` (over the batches
            of each product), ``distributed`` (every product is summed over the ranks, one
            ``all_reduce``), as for every data-bound operator
            (:class:`~cola_curvature.operators._bound.DataBound`).

    """

    #: The CoLA annotation the curvature carries (``PSD`` or ``SelfAdjoint``).
    annotation: type = SelfAdjoint

    #: Whether the operator has a ``compile=True`` route (GGN, empirical Fisher, Hessian;
    #: not the Monte-Carlo Fisher, whose targets are drawn per batch from a counter-based
    #: stream the compiled programs do not trace, nor the gradient moments).
    compilable: bool = False

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        *,
        check_deterministic: bool = True,
        compile: bool = False,
        **data_options: Any,
    ) -> None:
        if compile and not self.compilable:
            raise NotImplementedError(
                f"{type(self).__name__} has no compile=True route (GGN, EmpiricalFisher and "
                "Hessian have one); build it with compile=False."
            )
        #: Whether each batch's product runs a compiled program (the ``compile`` option).
        self._compile = compile
        self._bind(
            model, loss_func, params, data, check_deterministic=check_deterministic, **data_options
        )
        backend = self._backend
        self._loss = backend.loss
        shape = (backend.num_params, backend.num_params)
        # CoLA's rule gives a plain LinearOperator no annotations; ours is set without dispatch.
        init_operator(self, backend.dtype, shape, {self.annotation})
        if check_deterministic:
            self._check_deterministic()

    @abstractmethod
    def _batch_matmat(self, columns: list[Array], batch: tuple[Any, Any], rng: Any) -> list[Array]:
        """Return this batch's contribution to ``A V`` (risk scaling ``R`` included)."""

    def _sampling_seed(self) -> int | None:
        """Return the seed of the sampled targets (``None``: the operator is exact)."""
        return None

    def _matmat(self, X: Array) -> Array:
        """Return ``A X`` for ``X`` of shape ``(D, k)``, summed over all batches."""
        layout = self._layout
        return layout.flatten(self._matmat_columns(layout.unflatten(X)))

    def _matmat_columns(self, columns: list[Array]) -> list[Array]:
        """Return ``A V`` for per-parameter columns, summed over all batches (and ranks)."""
        total = None
        with self._backend.preserved_state():
            desc = f"{type(self).__name__} @ V"
            for batch, rng in self._data.sampled_batches(desc, self._sampling_seed()):
                contribution = self._batch_matmat(columns, batch, rng)
                total = (
                    contribution
                    if total is None
                    else [t + c for t, c in zip(total, contribution, strict=True)]
                )
        return self._data.combine_columns(total)

    def _check_deterministic(self) -> None:
        """Raise ``RuntimeError`` when data, model outputs or products are not reproducible.

        Raises:
            ValueError: inside ``jax.jit`` (or another transformation without values),
                where two products cannot be compared.

        """
        like = self.xnp.zeros((1,), dtype=self.dtype, device=self.device)
        probe = self._backend.random(0).normal((self.shape[1], 1), like)
        first = self._matmat(probe)
        if is_abstract(first):
            raise ValueError(
                f"check_deterministic compares two products by value, which {type(self).__name__} "
                "cannot do on traced parameters or data (inside jax.jit or jax.vmap). Pass "
                "check_deterministic=False there, and check once outside the transformation "
                "with concrete values if needed."
            )
        if not self._layout.arrays_close(first, self._matmat(probe)):
            raise RuntimeError(f"Two products with the same vector differ. {NONDETERMINISM_CAUSES}")
