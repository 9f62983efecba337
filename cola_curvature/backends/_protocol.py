"""The interface an autodiff backend offers to the curvature operators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from cola_curvature.kfac_statistics.moments import SignalRequest
from cola_curvature.losses import Loss, RandomSource
from cola_curvature.parameter_layout import ParameterLayout
from cola_curvature.types import Array, Batch

#: One entry per parameter, each of shape ``(k, *param.shape)``: ``k`` tangent columns.
ParamColumns = list[Array]
#: ``(f, y, JV, rng) -> U``: an output-space matrix applied to ``JV`` of shape
#: ``(k, *f.shape)``; ``rng`` is ``None`` for exact matrices. Pass a stable callable (a bound
#: method, not a fresh closure): the JAX backend compiles one program per callable.
OutputMatmat = Callable[[Array, Array, Array, RandomSource | None], Array]
#: ``(f, y) -> scalar``: the scaled risk contributed by one batch.
BatchRisk = Callable[[Array, Array], Array]


def require_loss(loss: Loss | None) -> Loss:
    """Return ``loss``, or raise ``TypeError`` for a backend built with ``loss_func=None``."""
    if loss is None:
        raise TypeError(
            "loss_func is None, but this computation needs a loss: pass e.g. nn.MSELoss(), "
            "nn.CrossEntropyLoss() or a cola_curvature.losses object such as cc.losses.MSE(). "
            "Only the Jacobian operators (cc.Jacobian, cc.JacobianTranspose) take no loss."
        )
    return loss


class ProcessGroup(Protocol):
    """The ranks a distributed curvature sums over (``torch.distributed``)."""

    def gather_counts(self, count: int) -> list[int]:
        """Return every rank's ``count``, in rank order."""

    def rank(self) -> int:
        """Return this process's rank."""

    def check_same_parameters(self, vector: Array) -> None:
        """Raise ``ValueError`` on every rank when the ranks' parameter vectors differ."""

    def sum(self, partial: Array) -> Array:
        """Return ``partial`` summed over all ranks (one ``all_reduce``)."""


class CurvatureBackend(Protocol):
    """Products with the Jacobian and Hessian of a model, and the plumbing around them.

    Built by ``curvature_backend(model, loss_func, params)``; with ``loss_func=None`` only
    the model-output products work (``forward``, ``output_jvp``, ``output_vjp``,
    ``output_jacobian``), and reading ``loss`` raises ``TypeError`` (see
    :func:`require_loss`).
    """

    loss: Loss
    dtype: Any
    device: Any
    num_params: int
    #: The parameters' names, shapes, flat order and user-facing format (written once, on
    #: CoLA's ``xnp``, for every backend).
    layout: ParameterLayout

    def forward(self, inputs: Any) -> Array:
        """Return the model output ``f(x)`` for one batch of inputs."""

    def gauss_newton_matmat(
        self,
        columns: ParamColumns,
        batch: Batch,
        output_matmat: OutputMatmat,
        rng: RandomSource | None,
        *,
        compiled: bool = False,
    ) -> ParamColumns:
        """Return ``Jᵀ M J V`` with ``M`` given by ``output_matmat``, one forward pass shared.

        ``compiled``: run a compiled program (torch: ``torch.compile``; JAX compiles always).
        """

    def process_group(self) -> ProcessGroup:
        """Return the process group ``distributed=True`` combines over; raise where none is."""

    def curvature_diagonal(
        self,
        batch: Batch,
        num_data: int,
        fisher_type: Any,
        mc_samples: int,
        rng: RandomSource,
    ) -> Array:
        """Return one batch's ``R Σ_{n,c} (J_nᵀ u_{n,c})²``, flat ``(D,)``: a curvature diagonal."""

    def output_jacobian(self, inputs: Any) -> tuple[Array, Array]:
        """Return ``f(x)`` and ``∂f/∂θ`` of shape ``(*f.shape, D)``."""

    def output_jvp(self, columns: ParamColumns, inputs: Any) -> Array:
        """Return ``J V`` of shape ``(k, *f.shape)`` for one batch of inputs (forward mode)."""

    def output_vjp(self, cotangents: Array, inputs: Any) -> ParamColumns:
        """Return ``Jᵀ U`` for output cotangents ``U`` of shape ``(k, *f.shape)`` (reverse mode)."""

    def value_and_grad(
        self, fn: Callable[..., Array], variables: Sequence[Array]
    ) -> tuple[Array, list[Array]]:
        """Return ``fn(*variables)`` and its gradient w.r.t. each (scalar) variable."""

    def gradient(self, batch: Batch, risk: BatchRisk) -> ParamColumns:
        """Return ``∇_θ risk(f_θ(x), y)`` on one batch, one array shaped like each parameter."""

    def hessian_matmat(
        self, columns: ParamColumns, batch: Batch, risk: BatchRisk, *, compiled: bool = False
    ) -> ParamColumns:
        """Return ``∇²_θ risk · V`` (``risk`` a stable callable, as ``output_matmat``).

        ``compiled``: as for :meth:`gauss_newton_matmat`.
        """

    def kronecker_layers(self, data: Iterable[Batch]) -> list[Any]:
        """Return the layers KFAC supports that own entries of ``params``.

        A traced backend (JAX) finds them in the model run on the first batch of ``data``.
        Each layer has ``name``, ``weight_index``, ``bias_index``, ``out_features``,
        ``weight_columns``, ``in_features`` and ``weight_positions`` (the flat position in the
        weight of every block entry, an ``(out_features, weight_columns)`` integer array).
        """

    def parameter_subset(self, indices: Sequence[int]) -> tuple[Any, Any]:
        """Return ``(model, params)`` for a curvature w.r.t. the chosen parameters only."""

    def kronecker_statistics(
        self, batch: Batch, request: SignalRequest, kfac_approx: Any, rng: RandomSource
    ) -> Any:
        """Return one batch's unnormalised KFAC factor statistics per layer use."""

    def kronecker_eigencorrections(
        self,
        batch: Batch,
        request: SignalRequest,
        rng: RandomSource,
        bases: dict[str, tuple[Array, Array]],
    ) -> dict[str, Array]:
        """Return one batch's EKFAC eigenvalue corrections per layer (shared weights too)."""

    def batch_size(self, inputs: Any) -> int:
        """Return the number of examples in a batch of inputs."""

    def check_batch(self, batch: Batch) -> None:
        """Raise when a batch contains NaN or infinite values."""

    def preserved_state(self) -> AbstractContextManager[None]:
        """Context in which RNG states and buffers the products touch are restored after."""

    def random(self, seed: int) -> RandomSource:
        """Return a random source seeded with ``seed`` that leaves global RNG alone."""

    def example_random(self, seed: int, first_example: int) -> RandomSource:
        """Return the source of Monte-Carlo targets of a batch starting at ``first_example``.

        Each example's numbers depend on ``seed`` and its global index only (the batch's
        example ``n`` has index ``first_example + n``; see
        :class:`~cola_curvature.losses.RandomSource`).
        """
