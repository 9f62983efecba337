"""The JAX curvature backend: a ``model_fn(params, x)`` with a pytree of parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cola_curvature._checks import check_array_library
from cola_curvature._tracing import is_traced
from cola_curvature.backends._protocol import require_loss
from cola_curvature.backends.jax import kfac, products
from cola_curvature.backends.jax.layout import ARRAYS, pytree_layout
from cola_curvature.backends.jax.state import JaxExampleRandom, JaxRandom
from cola_curvature.kfac_statistics.moments import SignalRequest
from cola_curvature.kfac_statistics.shared_weights import use_layers
from cola_curvature.losses import SUPPORTED_LOSSES, Loss
from cola_curvature.options import FisherType, KFACApprox
from cola_curvature.types import Array, PyTree


def _check_loss(loss_func: Any) -> Loss | None:
    """Return ``loss_func`` if it is a ``cola_curvature.losses`` object or ``None``, else raise."""
    if loss_func is not None and not isinstance(loss_func, Loss):
        names = ", ".join(f"cola_curvature.losses.{t.__name__}" for t in SUPPORTED_LOSSES)
        raise TypeError(
            f"A JAX model needs loss_func among {names}; got {type(loss_func).__name__}."
        )
    return loss_func


def _check_leaves(params: PyTree) -> tuple[list[str], list[Array], Any]:
    """Return the names, leaves (as JAX arrays) and tree structure of ``params``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not paths:
        raise TypeError(
            f"params must be a non-empty pytree of JAX arrays, got {type(params).__name__} "
            "without array leaves."
        )
    names = [jax.tree_util.keystr(path) or "params" for path, _ in paths]
    leaves = []
    for name, (_, leaf) in zip(names, paths, strict=True):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"params leaf {name} is a {type(leaf).__module__}.{type(leaf).__name__}; a JAX "
                "model_fn needs JAX arrays (convert with jnp.asarray(...); torch models go "
                "in as torch.nn.Module)."
            )
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"params leaf {name} has dtype {leaf.dtype}; curvature needs floating-point "
                "parameters: cast it (leaf.astype(jnp.float64)) or close over it in model_fn."
            )
        leaves.append(jnp.asarray(leaf))
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) > 1:
        raise ValueError(f"params must share one dtype, got {sorted(map(str, dtypes))}.")
    return names, leaves, treedef


# The compiled products, shared by every backend: ``model_fn`` (and the loss, the output-space
# matrix, the risk) are static arguments, hashed by identity, so operators rebuilt on the same
# model_fn (a new GGN or KFAC every training step) reuse one compiled program per batch shape
# instead of compiling their own. jit's cache keeps those static objects alive.
_forward = jax.jit(lambda model_fn, params, inputs: model_fn(params, inputs), static_argnums=0)
_gauss_newton = jax.jit(
    products.gauss_newton_matmat, static_argnums=0, static_argnames="output_matmat"
)
_hessian = jax.jit(products.hessian_matmat, static_argnums=0, static_argnames="risk")
_gradient = jax.jit(products.gradient, static_argnums=0, static_argnames="risk")
_output_jvp = jax.jit(products.output_jvp, static_argnums=0)
_output_vjp = jax.jit(products.output_vjp, static_argnums=0)
_squared_gradients = jax.jit(
    products.squared_cotangent_gradients,
    static_argnums=(0, 1),
    static_argnames=("fisher_type", "mc_samples"),
)


class JaxBackend:
    """Products of a JAX ``model_fn(params, x)``'s Jacobian and Hessian w.r.t. ``params``.

    Flat vectors and the rows of ``(D, k)`` matrices follow
    ``jax.flatten_util.ravel_pytree(params)``: the leaves in ``jax.tree_util`` order
    (dict keys sorted), each raveled in C order. Every product is jit-compiled once per
    ``model_fn``, batch shape and output-space matrix (static arguments), and the compiled
    programs are shared by all operators on the same ``model_fn`` and loss object: later
    products on the same shapes, of this operator or of one rebuilt from new parameter
    values, do not re-trace the model.

    Args:
        model: ``model_fn(params, x) -> outputs``, a pure function of JAX arrays.
        loss_func: A :mod:`cola_curvature.losses` object, or ``None`` for a backend of
            model-output products only (``forward``, ``output_jvp``, ``output_vjp``,
            ``output_jacobian``): anything that needs the loss then raises ``TypeError``.
        params: A pytree of floating-point arrays of one dtype, as ``model_fn`` takes it.

    """

    def __init__(self, model: Callable[[PyTree, Any], Array], loss_func: Any, params: PyTree):
        self._loss = _check_loss(loss_func)
        self._names, leaves, self._treedef = _check_leaves(params)
        self._model_fn = model
        self._params = self._treedef.unflatten(leaves)
        # traced leaves (inside jit) have no device: JAX places by the computation's sharding
        device = None if is_traced(leaves[0]) else next(iter(leaves[0].devices()))
        #: The parameters' flat (``ravel_pytree``) order, shapes and user-facing format.
        self.layout = pytree_layout(self._names, leaves, self._treedef, device)
        self.dtype = self.layout.dtype
        self.device = device
        self.num_params = self.layout.num_params
        self._forward = partial(_forward, model)
        self._gauss_newton = partial(_gauss_newton, model)
        self._hessian = partial(_hessian, model)
        self._gradient = partial(_gradient, model)
        self._squared_gradients = partial(_squared_gradients, model, self._loss)
        self._output_jvp = partial(_output_jvp, model)
        self._output_vjp = partial(_output_vjp, model)

    @property
    def loss(self) -> Loss:
        """Return the loss; ``TypeError`` for a backend built with ``loss_func=None``."""
        return require_loss(self._loss)

    def forward(self, inputs: Any) -> Array:
        """Return the model output ``f(x)``."""
        return self._forward(self._params, inputs)

    def output_jvp(self, columns: list[Array], inputs: Any) -> Array:
        """Return ``J V`` on one batch, shape ``(k, *f.shape)`` (compiled per batch shape)."""
        return self._output_jvp(self._params, self._treedef.unflatten(columns), inputs)

    def output_vjp(self, cotangents: Array, inputs: Any) -> list[Array]:
        """Return ``Jᵀ U`` on one batch for ``U`` of shape ``(k, *f.shape)``, per leaf."""
        return self._treedef.flatten_up_to(self._output_vjp(self._params, cotangents, inputs))

    def gauss_newton_matmat(
        self,
        columns: list[Array],
        batch: tuple[Any, Any],
        output_matmat: Callable,
        rng: JaxExampleRandom | None,
        *,
        compiled: bool = False,
    ) -> list[Array]:
        """Return ``Jᵀ M J V`` on one batch (see :func:`products.gauss_newton_matmat`).

        The product is always ``jax.jit``-compiled, so ``compiled`` changes nothing.
        """
        inputs, targets = batch
        result = self._gauss_newton(
            self._params,
            self._treedef.unflatten(columns),
            inputs,
            targets,
            rng,
            output_matmat=output_matmat,
        )
        return self._treedef.flatten_up_to(result)

    def process_group(self) -> None:
        """Raise: ``distributed=True`` is for ``torch.distributed``; JAX shards over devices."""
        raise NotImplementedError(
            "distributed=True combines torch.distributed ranks; for JAX, shard each batch over "
            "a device mesh instead (jax.device_put(batch, NamedSharding(mesh, P('data')))): "
            "the jit-compiled products then run data-parallel and sum over the devices."
        )

    def output_jacobian(self, inputs: Any) -> tuple[Array, Array]:
        """Return ``f(x)`` and ``∂f/∂θ`` of shape ``(*f.shape, D)`` by ``jax.jacrev``."""
        outputs = self._forward(self._params, inputs)
        jacobian = jax.jacrev(lambda p: self._model_fn(p, inputs))(self._params)
        leaves = self._treedef.flatten_up_to(jacobian)
        flat = [j.reshape(*outputs.shape, -1) for j in leaves]
        return outputs, jnp.concatenate(flat, axis=-1)

    def value_and_grad(
        self, fn: Callable[..., Array], variables: Sequence[Array]
    ) -> tuple[Array, list[Array]]:
        """Return ``fn(*variables)`` and its gradients by ``jax.value_and_grad``."""
        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(variables))))(*variables)
        return value, list(grads)

    def gradient(self, batch: tuple[Any, Any], risk: Callable) -> list[Array]:
        """Return ``∇_θ risk`` on one batch, compiled once per batch shape and ``risk``."""
        inputs, targets = batch
        return self._treedef.flatten_up_to(self._gradient(self._params, inputs, targets, risk=risk))

    def curvature_diagonal(
        self,
        batch: tuple[Any, Any],
        num_data: int,
        fisher_type: Any,
        mc_samples: int,
        rng: JaxExampleRandom,
    ) -> Array:
        """Return one batch's ``R Σ_{n,c} (J_nᵀ u_{n,c})²``, flat: the exact curvature diagonal.

        ``u`` are the output cotangents of ``fisher_type`` (type-2: the GGN's diagonal; mc:
        the Monte-Carlo Fisher's, drawn as :class:`~cola_curvature.FisherMC` draws them for
        the same seed; empirical: the empirical Fisher's), from per-example gradients
        (:func:`products.squared_cotangent_gradients`, compiled once per batch shape).
        """
        inputs, targets = batch
        rng = rng if fisher_type is FisherType.MC else None
        squares = self._squared_gradients(
            self._params, inputs, targets, rng, fisher_type=fisher_type, mc_samples=mc_samples
        )
        flat = jnp.concatenate([s.reshape(-1) for s in self._treedef.flatten_up_to(squares)])
        outputs = jax.eval_shape(self._model_fn, self._params, inputs)
        return self.loss.scale(outputs, num_data) * flat

    def hessian_matmat(
        self,
        columns: list[Array],
        batch: tuple[Any, Any],
        risk: Callable,
        *,
        compiled: bool = False,
    ) -> list[Array]:
        """Return ``∇²_θ risk · V`` on one batch (see :func:`products.hessian_matmat`).

        The product is always ``jax.jit``-compiled, so ``compiled`` changes nothing.
        """
        inputs, targets = batch
        result = self._hessian(
            self._params, self._treedef.unflatten(columns), inputs, targets, risk=risk
        )
        return self._treedef.flatten_up_to(result)

    def kronecker_layers(self, data: Any) -> list[kfac.JaxKroneckerLayer]:
        """Return the dense/conv layers of ``model_fn`` traced on the first batch of ``data``."""
        inputs = next(iter(data))[0]
        return kfac.kronecker_layers(self._model_fn, self._params, self._names, inputs)

    def _signal_options(self, request: SignalRequest) -> kfac.SignalOptions:
        """Return the static options of the compiled KFAC programs (uses of shared weights)."""
        return kfac.SignalOptions(
            self._model_fn,
            self.loss,
            tuple(self._names),
            tuple(use_layers(request.layers)),
            request.num_data,
            request.fisher_type,
            request.mc_samples,
        )

    def kronecker_statistics(
        self,
        batch: tuple[Any, Any],
        request: SignalRequest,
        kfac_approx: KFACApprox,
        rng: JaxExampleRandom,
    ) -> Any:
        """Return one batch's unnormalised KFAC factor statistics per layer use (compiled)."""
        inputs, targets = batch
        rng = rng if request.fisher_type is FisherType.MC else None
        return kfac.kronecker_statistics(
            self._params,
            inputs,
            targets,
            rng,
            options=self._signal_options(request),
            kfac_approx=kfac_approx,
        )

    def kronecker_eigencorrections(
        self,
        batch: tuple[Any, Any],
        request: SignalRequest,
        rng: JaxExampleRandom,
        bases: dict[str, tuple[Array, Array]],
    ) -> dict[str, Array]:
        """Return one batch's EKFAC eigenvalue corrections per layer (compiled)."""
        inputs, targets = batch
        rng = rng if request.fisher_type is FisherType.MC else None
        options = self._signal_options(request)
        return kfac.kronecker_eigencorrections(
            self._params, inputs, targets, rng, bases, options=options, layers=request.layers
        )

    def parameter_subset(self, indices: Sequence[int]) -> tuple[Callable, list[Array]]:
        """Return ``(model_fn', leaves)``: the model as a function of the chosen leaves only.

        The other leaves are held at their current values; the subset is a list in
        ``indices`` order.
        """
        leaves = self._treedef.flatten_up_to(self._params)

        def subset_model(subset: Sequence[Array], inputs: Any) -> Array:
            merged = list(leaves)
            for i, leaf in zip(indices, subset, strict=True):
                merged[i] = leaf
            return self._model_fn(self._treedef.unflatten(merged), inputs)

        return subset_model, [leaves[i] for i in indices]

    def batch_size(self, inputs: Any) -> int:
        """Return ``inputs.shape[0]``; other inputs need a ``batch_size_fn``."""
        if not isinstance(inputs, (jax.Array, np.ndarray)):
            raise TypeError(
                f"inputs of type {type(inputs).__name__} are not an array; pass "
                "batch_size_fn=... that returns the number of examples in a batch."
            )
        return inputs.shape[0]

    def check_batch(self, batch: tuple[Any, Any]) -> None:
        """Raise when a batch holds NaN or infinite values, or ``model_fn`` rejects it.

        ``model_fn(params, X)`` is evaluated abstractly (``jax.eval_shape``), so a
        ``params`` pytree that does not fit ``model_fn`` fails here, at construction.
        Arrays traced by ``jax.jit`` have no values and skip the NaN check.
        """
        check_array_library(
            batch,
            (jax.Array, np.ndarray),
            "a JAX model",
            "JAX or NumPy arrays: convert each with jnp.asarray(np.asarray(x))",
        )
        for x in jax.tree_util.tree_leaves(batch):
            if not isinstance(x, (jax.Array, np.ndarray)):
                continue
            if is_traced(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
                continue
            if not ARRAYS.all_finite(x):
                raise ValueError(
                    "data contains NaN or infinite values; clean or impute them before "
                    "building a curvature operator."
                )
        try:
            outputs = jax.eval_shape(self._model_fn, self._params, batch[0])
        except Exception as error:  # any failure inside user code means the same fix
            raise ValueError(
                f"model_fn(params, X) failed with {type(error).__name__}: {error}\nCheck that "
                "params is the pytree model_fn expects (structure and leaf shapes) and that "
                "X is a batch of its inputs."
            ) from error
        if not isinstance(outputs, jax.ShapeDtypeStruct) or not jnp.issubdtype(
            outputs.dtype, jnp.floating
        ):
            raise TypeError(
                f"model_fn(params, X) must return one floating-point array, got {outputs}."
            )

    def preserved_state(self) -> AbstractContextManager[None]:
        """Return a no-op context: JAX has no global RNG or buffers a product could change."""
        return nullcontext()

    def random(self, seed: int) -> JaxRandom:
        """Return a random source over its own ``jax.random`` key, seeded with ``seed``."""
        return JaxRandom.seeded(seed)

    def example_random(self, seed: int, first_example: int) -> JaxExampleRandom:
        """Return the per-example keyed source of a batch starting at ``first_example``."""
        return JaxExampleRandom.seeded(seed, first_example)
