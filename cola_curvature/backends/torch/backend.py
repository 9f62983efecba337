"""The PyTorch curvature backend: a functional view of an ``nn.Module`` and its products."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from cola_curvature._checks import check_array_library
from cola_curvature.backends._protocol import require_loss
from cola_curvature.backends.torch import kfac, per_example, products
from cola_curvature.backends.torch.compiled import CompiledProducts
from cola_curvature.backends.torch.distributed import TorchProcessGroup
from cola_curvature.backends.torch.layout import TENSORS, tensor_layout
from cola_curvature.backends.torch.losses import as_loss
from cola_curvature.backends.torch.state import (
    TorchExampleRandom,
    TorchRandom,
    preserved_global_state,
)
from cola_curvature.kfac_statistics import moments as statistics
from cola_curvature.kfac_statistics import shared_weights
from cola_curvature.losses import Loss
from cola_curvature.options import FisherType, KFACApprox


def _parameter_names(model: nn.Module, params: Sequence[Any]) -> list[str]:
    """Return the module names of ``params``, matched by identity, with clear errors."""
    if not isinstance(params, (list, tuple)) or len(params) == 0:
        raise TypeError(
            "params must be a non-empty list of the model's parameters, got "
            f"{type(params).__name__}."
        )
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}.")
        if id(p) not in names_by_id:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the model; pass "
                "tensors from model.parameters() (the same objects, not copies)."
            )
        names.append(names_by_id[id(p)])
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"params lists {', '.join(duplicated)} more than once; pass each once.")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"params must share one dtype and device, got dtypes {dtypes} and devices {devices}."
        )
    return names


def _check_no_batch_statistics(model: nn.Module) -> None:
    """Raise ``ValueError`` for batch-norm layers in train mode.

    They normalise with the statistics of the current batch, so the curvature would depend
    on how the data is split into batches (and examples would not be independent).
    """
    training = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if training:
        raise ValueError(
            f"batch-norm layers {', '.join(repr(n) for n in training)} are in train mode: they "
            "normalise with each batch's statistics, so the curvature would change with the "
            "batching. Call model.eval() first (they then use their running statistics)."
        )


@contextmanager
def _parameters_restored(model: nn.Module) -> Iterator[None]:
    """Put every module's own parameters back on exit, whatever ``functional_call`` left.

    ``torch.func.functional_call`` (torch 2.13) does not restore a module registered under
    two names (``nn.Sequential(layer, act, layer)``): it leaves the substituted tensor in
    the module, so the user's model would lose its parameters.
    """
    saved = [(module, dict(module._parameters)) for module in model.modules()]
    try:
        yield
    finally:
        for module, parameters in saved:
            for name, parameter in parameters.items():
                if module._parameters.get(name) is not parameter:
                    module._parameters[name] = parameter


class TorchBackend:
    """Products of a torch model's Jacobian and Hessian w.r.t. a subset of its parameters.

    The model runs through :func:`torch.func.functional_call` on detached copies of
    the parameters and clones of the buffers, so the user's tensors, ``requires_grad``
    flags, train/eval modes and batch-norm statistics are never modified. With
    ``loss_func=None`` only the products of the model's outputs work (``forward``,
    ``output_jvp``, ``output_vjp``, ``output_jacobian``); anything that needs the loss
    raises ``TypeError``.
    """

    def __init__(self, model: nn.Module, loss_func: Any, params: Sequence[torch.Tensor]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        _check_no_batch_statistics(model)
        self._loss = None if loss_func is None else as_loss(loss_func)
        self._model = model
        self._names = _parameter_names(model, params)
        self._params = list(params)
        #: The parameters' flat order, shapes and user-facing format.
        self.layout = tensor_layout(self._names, self._params)
        self.dtype = self.layout.dtype
        self.device = self.layout.device
        self.num_params = self.layout.num_params
        #: What earlier products learnt about the model's autodiff (forward mode missing).
        self._routes = products.ProductRoutes()
        #: The ``torch.compile``d products (``compiled=True``), built on first use.
        self._compiled: CompiledProducts | None = None
        #: Why KFAC leaves a parameter uncovered, by position in ``params`` (tied weights, ...).
        self.uncovered_reasons: dict[int, str] = {}

    @property
    def loss(self) -> Loss:
        """Return the loss; ``TypeError`` for a backend built with ``loss_func=None``."""
        return require_loss(self._loss)

    def _functional_state(self) -> dict[str, torch.Tensor]:
        """Return detached parameters and cloned buffers for one functional call."""
        state = {name: p.detach() for name, p in self._model.named_parameters()}
        state.update({name: b.clone() for name, b in self._model.named_buffers()})
        return state

    def _model_fn(self) -> Callable[[Sequence[torch.Tensor], Any], torch.Tensor]:
        """Return ``(params, inputs) -> f`` evaluating the model at the given ``params``."""
        state = self._functional_state()

        def model_fn(params: Sequence[torch.Tensor], inputs: Any) -> torch.Tensor:
            state.update(zip(self._names, params, strict=True))
            # torch's fused attention kernels have neither forward-mode AD nor double
            # backward on CPU; the math kernel computes the same function with both.
            with sdpa_kernel(SDPBackend.MATH), _parameters_restored(self._model):
                outputs = functional_call(self._model, state, (inputs,))
            if not isinstance(outputs, torch.Tensor):
                raise TypeError(
                    f"the model returned a {type(outputs).__name__}; curvature operators need "
                    "a model whose forward returns one tensor of outputs. Wrap it in an "
                    "nn.Module whose forward returns the logits, e.g. model(x)[0] or "
                    "model(x)['logits']."
                )
            return outputs

        return model_fn

    def _compiled_products(self) -> CompiledProducts:
        """Return the backend's compiled products, created on first use."""
        if self._compiled is None:
            self._compiled = CompiledProducts(self._model, self._names)
        return self._compiled

    def forward(self, inputs: Any) -> torch.Tensor:
        """Return the model output ``f(x)`` without a graph."""
        with torch.no_grad():
            return self._model_fn()(self._params, inputs)

    def curvature_diagonal(
        self,
        batch: tuple[Any, Any],
        num_data: int,
        fisher_type: FisherType,
        mc_samples: int,
        rng: TorchExampleRandom,
    ) -> torch.Tensor:
        """Return one batch's ``R Σ_{n,c} (J_nᵀ u_{n,c})²``: the exact curvature diagonal.

        ``u`` are the output cotangents of ``fisher_type`` (as for KFAC), so this is the
        diagonal of the GGN (type-2), of the Monte-Carlo Fisher (mc) or of the empirical
        Fisher (empirical). The per-example gradients are held a chunk at a time
        (:func:`per_example.summed_squared_gradients`).
        """
        inputs, targets = batch
        model_fn = self._model_fn()
        outputs = self.forward(inputs)
        self.loss.check_target(outputs, targets)
        cotangents = statistics.output_cotangents(
            self.loss, outputs, targets, fisher_type, mc_samples, rng
        )
        squares = per_example.summed_squared_gradients(model_fn, self._params, inputs, cotangents)
        return self.loss.scale(outputs, num_data) * squares

    def process_group(self) -> TorchProcessGroup:
        """Return the default ``torch.distributed`` group; ``RuntimeError`` unless initialised."""
        return TorchProcessGroup.check()

    def value_and_grad(
        self, fn: Callable[..., torch.Tensor], variables: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``fn(*variables)`` and its gradients by ``torch.autograd.grad``."""
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(True) for v in variables]
            value = fn(*leaves)
            grads = torch.autograd.grad(value, leaves)
        return value.detach(), list(grads)

    def output_jacobian(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``f(x)`` and the Jacobian ``∂f/∂θ`` of shape ``(*f.shape, D)``.

        Reverse mode over all output entries (``torch.func.jacrev``): ``numel(f)`` backward
        passes batched by ``vmap``; for predictive variances on small test batches.
        """
        model_fn = self._model_fn()
        params = [p.detach() for p in self._params]
        with self.preserved_state():
            outputs = model_fn(params, inputs).detach()
            jacobians = torch.func.jacrev(
                lambda *ps: model_fn(ps, inputs), argnums=tuple(range(len(params)))
            )(*params)
        flat = [j.reshape(*outputs.shape, -1) for j in jacobians]
        return outputs, torch.cat(flat, dim=-1)

    def output_jvp(self, columns: list[torch.Tensor], inputs: Any) -> torch.Tensor:
        """Return ``J V`` on one batch, shape ``(k, *f.shape)`` (:func:`products.output_jvp`)."""
        return products.output_jvp(self._model_fn(), self._params, columns, inputs, self._routes)

    def output_vjp(self, cotangents: torch.Tensor, inputs: Any) -> list[torch.Tensor]:
        """Return ``Jᵀ U`` on one batch for ``U`` of shape ``(k, *f.shape)``, per parameter."""
        if cotangents.is_inference():  # autodiff cannot use an inference-mode tensor
            with torch.inference_mode(False):
                cotangents = cotangents.clone()
        return products.output_vjp(self._model_fn(), self._params, cotangents, inputs)

    def gauss_newton_matmat(
        self,
        columns: list[torch.Tensor],
        batch: tuple[Any, Any],
        output_matmat: Callable,
        rng: TorchExampleRandom | None,
        *,
        compiled: bool = False,
    ) -> list[torch.Tensor]:
        """Return ``Jᵀ M J V`` on one batch (see :func:`products.gauss_newton_matmat`).

        ``compiled``: through :meth:`CompiledProducts.gauss_newton_matmat` (a deterministic
        map of :mod:`~cola_curvature.operators._output_space`; ``rng`` unused).
        """
        if compiled:
            with _parameters_restored(self._model):
                return self._compiled_products().gauss_newton_matmat(
                    self._params, self._functional_state(), columns, batch, output_matmat
                )
        inputs, targets = batch
        return products.gauss_newton_matmat(
            self._model_fn(),
            self._params,
            columns,
            inputs,
            targets,
            lambda f, y, jv: output_matmat(f, y, jv, rng),
            self._routes,
        )

    def gradient(self, batch: tuple[Any, Any], risk: Callable) -> list[torch.Tensor]:
        """Return ``∇_θ risk`` on one batch (see :func:`products.gradient`)."""
        inputs, targets = batch
        return products.gradient(self._model_fn(), self._params, inputs, targets, risk)

    def hessian_matmat(
        self,
        columns: list[torch.Tensor],
        batch: tuple[Any, Any],
        risk: Callable,
        *,
        compiled: bool = False,
    ) -> list[torch.Tensor]:
        """Return ``∇²_θ risk · V`` on one batch (see :func:`products.hessian_matmat`).

        ``compiled``: through :meth:`CompiledProducts.hessian_matmat`.
        """
        if compiled:
            with _parameters_restored(self._model):
                return self._compiled_products().hessian_matmat(
                    self._params, self._functional_state(), columns, batch, risk
                )
        inputs, targets = batch
        return products.hessian_matmat(
            self._model_fn(), self._params, columns, inputs, targets, risk, self._routes
        )

    def kronecker_layers(self, data: Any) -> list[kfac.KroneckerLayer]:
        """Return the layers owning entries of ``params``, found on ``data``'s first example.

        Why the other parameters are not covered is kept in ``uncovered_reasons``.
        """
        with self.preserved_state():  # a DataLoader's iterator draws from the global RNG
            inputs, _ = next(iter(data))
            layers, self.uncovered_reasons = kfac.kronecker_layers(
                self._model_fn(), self._params, self._names, inputs
            )
        return layers

    def parameter_subset(self, indices: Sequence[int]) -> tuple[nn.Module, list[torch.Tensor]]:
        """Return the model and the chosen entries of ``params`` (the user's tensors)."""
        return self._model, [self._params[i] for i in indices]

    def _layer_signals(
        self, batch: tuple[Any, Any], request: statistics.SignalRequest, rng: TorchExampleRandom
    ) -> statistics.LayerSignals:
        """Return one batch's signals of every layer use (shared weights' uses separately)."""
        return kfac.layer_signals(
            self._model_fn(),
            self._params,
            shared_weights.use_layers(request.layers),
            batch,
            self.loss,
            request.num_data,
            request.fisher_type,
            request.mc_samples,
            rng,
        )

    def kronecker_statistics(
        self,
        batch: tuple[Any, Any],
        request: statistics.SignalRequest,
        kfac_approx: KFACApprox,
        rng: TorchExampleRandom,
    ) -> statistics.BatchStatistics:
        """Return one batch's unnormalised KFAC factor statistics per layer use."""
        signals = self._layer_signals(batch, request, rng)
        return statistics.batch_statistics(signals, kfac_approx)

    def kronecker_eigencorrections(
        self,
        batch: tuple[Any, Any],
        request: statistics.SignalRequest,
        rng: TorchExampleRandom,
        bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Return one batch's EKFAC eigenvalue corrections per layer (shared weights too)."""
        signals = self._layer_signals(batch, request, rng)
        return shared_weights.layer_eigencorrections(signals, request.layers, bases)

    def batch_size(self, inputs: Any) -> int:
        """Return ``inputs.shape[0]``; other inputs need a ``batch_size_fn``."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"inputs of type {type(inputs).__name__} are not a tensor; pass "
                "batch_size_fn=... that returns the number of examples in a batch."
            )
        return inputs.shape[0]

    def check_batch(self, batch: tuple[Any, Any]) -> None:
        """Raise when a batch holds arrays other than tensors, or NaN or infinite values."""
        check_array_library(
            batch,
            (torch.Tensor,),
            "a torch model",
            "tensors: convert each with torch.as_tensor(np.asarray(x))",
        )
        for t in torch.utils._pytree.tree_leaves(batch):
            if not isinstance(t, torch.Tensor):
                continue
            if t.is_meta:
                raise ValueError(
                    "data holds tensors on the meta device, which have shapes but no values; "
                    "materialise them on a real device (e.g. x.to_empty(device='cpu') and fill "
                    "them) before building a curvature operator."
                )
            if t.is_floating_point() and not TENSORS.all_finite(t):
                raise ValueError(
                    "data contains NaN or infinite values; clean or impute them before "
                    "building a curvature operator."
                )

    def preserved_state(self) -> AbstractContextManager[None]:
        """Context restoring the global RNG states on exit (see :func:`preserved_global_state`)."""
        return preserved_global_state(self.device)

    def random(self, seed: int) -> TorchRandom:
        """Return a random source with its own generator, seeded with ``seed``."""
        return TorchRandom(seed, self.device)

    def example_random(self, seed: int, first_example: int) -> TorchExampleRandom:
        """Return the counter-based source of a batch starting at example ``first_example``."""
        return TorchExampleRandom(seed, first_example)
