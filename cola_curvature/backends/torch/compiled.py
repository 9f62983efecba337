"""``torch.compile``d Gauss-Newton-type and Hessian products of one batch (``compile=True``).

The eager products (:mod:`~cola_curvature.backends.torch.products`) record one graph and
replay tangents below autograd; here each product is one pure function of
``(params, state, columns, inputs, targets)`` written with :mod:`torch.func` and compiled
by ``torch.compile`` (inductor), which fuses the forward, tangent and backward passes:

- Gauss-Newton type, ``Jᵀ M J V``: ``torch.func.vjp`` of the model (one forward pass and
  its pullback), one ``torch.func.jvp`` per column, the output-space matrix ``M`` applied
  to all columns at once, one pullback per column.
- Hessian, ``∇²_θ risk · V``: reverse over reverse, ``torch.func.vjp`` of
  ``torch.func.grad`` of the risk, one pullback per column.

Neither maps forward mode over columns with ``vmap`` (wrong on ``LayerNorm`` in torch
2.13). A program is compiled once per backend, output-space map and column count, with
``dynamic=False``: every new batch shape (a smaller last batch) compiles once more, and
torch runs a function eagerly after ``torch._dynamo.config.recompile_limit`` shapes.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import cola.backends
import torch
from cola.backends import torch_fns
from torch import nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from cola_curvature import losses
from cola_curvature.backends.torch.autodiff_routes import custom_functions

#: ``(params, state, columns, inputs, targets) -> (f, products)``, compiled.
Program = Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]


def _torch_library_fns(dtype: torch.dtype) -> Any:
    """Return CoLA's torch namespace: what ``get_library_fns`` answers for a torch dtype.

    The losses look their array functions up with CoLA's ``get_library_fns``, which probes
    every installed library (``jnp.array``) and so breaks a ``torch.compile`` graph;
    compiled programs only ever see torch dtypes, so dynamo traces this instead.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"compiled products take torch dtypes, got {dtype!r}.")
    return torch_fns


@functools.cache
def _substitute_library_lookups() -> None:
    """Let dynamo trace :func:`_torch_library_fns` for CoLA's lookups (once, before compiling).

    Registered on first use, not at import: it imports ``torch._dynamo`` (about 2 s), which
    users who never pass ``compile=True`` should not pay for.
    """
    lookups = (cola.backends.get_library_fns, losses.get_library_fns)
    for lookup in {id(f): f for f in lookups}.values():
        torch.compiler.substitute_in_graph(lookup)(_torch_library_fns)


def _call(
    model: nn.Module,
    names: tuple[str, ...],
    params: tuple[torch.Tensor, ...],
    state: dict[str, torch.Tensor],
    inputs: Any,
) -> torch.Tensor:
    """Return the model's output at ``params`` (the rest of its tensors from ``state``)."""
    # The math attention kernel: the fused ones have no forward-mode AD or double backward.
    with sdpa_kernel(SDPBackend.MATH):
        return functional_call(model, {**state, **dict(zip(names, params, strict=True))}, inputs)


def _gauss_newton_program(
    model: nn.Module, names: tuple[str, ...], output_matmat: Callable, num_columns: int
) -> Program:
    """Return the uncompiled ``Jᵀ M J V`` of ``num_columns`` columns (see the module)."""

    def program(
        params: tuple[torch.Tensor, ...],
        state: dict[str, torch.Tensor],
        columns: tuple[torch.Tensor, ...],
        inputs: Any,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        def model_fn(*ps: torch.Tensor) -> torch.Tensor:
            return _call(model, names, ps, state, inputs)

        outputs, pullback = vjp(model_fn, *params)
        tangents = torch.stack(
            [jvp(model_fn, params, tuple(c[i] for c in columns))[1] for i in range(num_columns)]
        )
        output_columns = output_matmat(outputs, targets, tangents)
        pulled = [pullback(output_columns[i]) for i in range(num_columns)]
        return outputs, tuple(torch.stack(parts) for parts in zip(*pulled, strict=True))

    return program


def _hessian_program(
    model: nn.Module, names: tuple[str, ...], risk: Callable, num_columns: int
) -> Program:
    """Return the uncompiled ``∇²_θ risk · V`` of ``num_columns`` columns (see the module)."""

    def program(
        params: tuple[torch.Tensor, ...],
        state: dict[str, torch.Tensor],
        columns: tuple[torch.Tensor, ...],
        inputs: Any,
        targets: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        def risk_and_outputs(*ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = _call(model, names, ps, state, inputs)
            return risk(outputs, targets), outputs

        argnums = tuple(range(len(params)))
        gradient = grad(risk_and_outputs, argnums=argnums, has_aux=True)
        _, pullback, outputs = vjp(gradient, *params, has_aux=True)
        pulled = [pullback(tuple(c[i] for c in columns)) for i in range(num_columns)]
        return outputs, tuple(torch.stack(parts) for parts in zip(*pulled, strict=True))

    return program


def _own_code(program: Program) -> Program:
    """Return ``program`` on a code object of its own.

    Dynamo keeps compiled graphs, and counts recompilations against
    ``torch._dynamo.config.recompile_limit``, per code object; the programs above are
    closures of one code object each, so without this every operator's graphs would share
    one budget and later operators would run eagerly.
    """
    code = program.__code__.replace(co_name=f"{program.__code__.co_name}_{id(program):x}")
    return types.FunctionType(
        code, program.__globals__, code.co_name, program.__defaults__, program.__closure__
    )


class CompiledProducts:
    """The compiled product programs of one model and parameter list, built on first use.

    Args:
        model: The ``nn.Module``.
        names: The names of the parameters the products are taken with respect to.

    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self._model = model
        self._names = tuple(names)
        self._programs: dict[tuple, Program] = {}

    def _run(
        self,
        key: tuple,
        build: Callable[[], Program],
        params: Sequence[torch.Tensor],
        state: dict[str, torch.Tensor],
        columns: Sequence[torch.Tensor],
        batch: tuple[Any, Any],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(f, products)`` from the program under ``key`` (compiled on first use).

        Raises:
            NotImplementedError: when ``torch.func`` or the compiler cannot handle the
                model, or its graph has a custom ``autograd.Function`` (checked by one eager
                forward pass before compiling); ``compile=False`` has routes for those.

        """
        inputs, targets = batch
        detached = tuple(p.detach() for p in params)
        program = self._programs.get(key)
        if program is None:
            self._refuse_custom_functions(detached, state, inputs)
            _substitute_library_lookups()
            program = self._programs[key] = torch.compile(_own_code(build()), dynamic=False)
        try:
            outputs, products = program(detached, state, tuple(columns), (inputs,), targets)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, torch._dynamo.exc.TorchDynamoException) as error:
            raise NotImplementedError(
                f"compile=True could not compile or run {key[0]} products of "
                f"{type(self._model).__name__} ({type(error).__name__}: {error}). Build the "
                "operator with compile=False: the eager products have routes for models "
                "without forward-mode AD or double backward."
            ) from error
        return outputs, list(products)

    def _refuse_custom_functions(
        self, params: tuple[torch.Tensor, ...], state: dict[str, torch.Tensor], inputs: Any
    ) -> None:
        """Raise ``NotImplementedError`` when the model's graph has a custom ``autograd.Function``.

        Dynamo traces such a ``Function``'s forward, so forward-mode derivatives would come
        from its forward operations while reverse mode uses its ``backward``: a
        ``Function`` whose backward is not the derivative of its forward (a
        straight-through estimator) would give a silently different matrix.
        """
        leaves = tuple(p.requires_grad_(True) for p in (q.detach() for q in params))
        with torch.enable_grad():
            outputs = _call(self._model, self._names, leaves, state, (inputs,))
        found = custom_functions(outputs.grad_fn)
        if found:
            raise NotImplementedError(
                f"compile=True does not support custom autograd.Functions "
                f"({', '.join(c.__qualname__ for c in found)}): the compiled program would "
                "take forward-mode derivatives from their forward operations, not from their "
                "jvp or backward. Build the operator with compile=False."
            )

    def gauss_newton_matmat(
        self,
        params: Sequence[torch.Tensor],
        state: dict[str, torch.Tensor],
        columns: Sequence[torch.Tensor],
        batch: tuple[Any, Any],
        output_matmat: Any,
    ) -> list[torch.Tensor]:
        """Return ``Jᵀ M J V`` on one batch; targets checked against the outputs it returns.

        ``output_matmat`` is a deterministic output-space map of
        :mod:`~cola_curvature.operators._output_space` (hashable: part of the program's
        key); its ``unchecked`` part is compiled, its ``check`` runs eagerly.
        Cost: about one forward, one tangent and one backward pass per column, fused.
        """
        num_columns = columns[0].shape[0]
        key = ("J^T M J V", output_matmat, num_columns)

        def build() -> Program:
            return _gauss_newton_program(
                self._model, self._names, output_matmat.unchecked, num_columns
            )

        outputs, products = self._run(key, build, params, state, columns, batch)
        output_matmat.check(outputs, batch[1])
        return products

    def hessian_matmat(
        self,
        params: Sequence[torch.Tensor],
        state: dict[str, torch.Tensor],
        columns: Sequence[torch.Tensor],
        batch: tuple[Any, Any],
        risk: Any,
    ) -> list[torch.Tensor]:
        """Return ``∇²_θ risk · V`` on one batch, reverse over reverse; targets checked after.

        ``risk`` is :class:`~cola_curvature.operators._output_space.ScaledRisk` (its
        ``unchecked`` part compiled, its ``check`` eager). Cost: one forward, one backward
        pass recording its graph and one backward pass through it per column, fused.
        """
        num_columns = columns[0].shape[0]
        key = ("H V", risk, num_columns)

        def build() -> Program:
            return _hessian_program(self._model, self._names, risk.unchecked, num_columns)

        outputs, products = self._run(key, build, params, state, columns, batch)
        risk.check(outputs, batch[1])
        return products
