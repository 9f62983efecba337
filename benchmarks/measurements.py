"""What the harness times for one model: callables grouped by row (what) and implementation.

Every :class:`Measurement` has a ``row`` (``"GGN @ v"``, ``"KFAC build mc"``, …), an
``impl`` (``"ours"``, ``"curvlinops"`` or ``"plain"``: hand-written ``torch.func``/autograd or
``jax`` code, and the gradient itself), a thunk that runs it once to completion, the number
of columns its time is divided by, and a callable that returns its peak memory in MiB.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cola
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import cola_curvature as cc
from benchmarks.workloads import jax_problem, kfac_params, torch_problem

NUM_COLUMNS = 8
DAMPING = 1e-3
FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
OPERATORS = {
    "Hessian": cc.Hessian,
    "GGN": cc.GGN,
    "EmpiricalFisher": cc.EmpiricalFisher,
    "FisherMC": cc.FisherMC,
}
MATRIX_ROW = f"@ V ({NUM_COLUMNS} col.)"
KFAC_INVERSE_ROW = "KFAC inverse @ v (cached)"
KFAC_HEURISTIC_INVERSE_ROW = "KFAC inverse @ v (heuristic damping, cached)"
EKFAC_ROW = "EKFAC build type-2"
_FACTORS = ("output_factor", "input_factor", "q_out", "q_in", "eigenvalues")  # block arrays
# The table's rows, in order; a model's JSON holds those it measured.
ROWS = (
    "gradient",
    *(f"{name} {suffix}" for name in OPERATORS for suffix in ("@ v", MATRIX_ROW)),
    *(f"KFAC build {fisher_type}" for fisher_type in FISHER_TYPES),
    EKFAC_ROW,
    KFAC_INVERSE_ROW,
    KFAC_HEURISTIC_INVERSE_ROW,
)


@dataclass
class Measurement:
    """One timed callable; ``columns`` divides its time, ``memory`` returns its peak in MiB."""

    row: str
    impl: str
    thunk: Callable[[], object]
    columns: int = 1
    memory: Callable[[], float | None] | None = None


def _generator_vectors(num_params: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one vector and one ``NUM_COLUMNS``-column matrix, from a fixed seed."""
    generator = torch.Generator().manual_seed(2)
    return (
        torch.randn(num_params, generator=generator),
        torch.randn(num_params, NUM_COLUMNS, generator=generator),
    )


def kfac_measurements(
    model: Any, loss: Any, params: Any, data: list, block: Callable[[Any], object], v: Any
) -> list[Measurement]:
    """Return our KFAC builds per ``fisher_type``, the EKFAC build and the cached inverse apply.

    Backend-neutral: the same calls build the operators of a torch module or a JAX
    ``model_fn``; ``block`` waits for a result (JAX dispatches asynchronously).
    """

    def build(operator: type, fisher_type: str) -> Callable[[], object]:
        def thunk() -> object:
            built = operator(
                model, loss, params, data, fisher_type=fisher_type, check_deterministic=False
            )
            return block([getattr(b, n) for b in built.blocks for n in _FACTORS if hasattr(b, n)])

        return thunk

    rows = [
        Measurement(f"KFAC build {fisher_type}", "ours", build(cc.KFAC, fisher_type))
        for fisher_type in FISHER_TYPES
    ]
    rows.append(Measurement(EKFAC_ROW, "ours", build(cc.EKFAC, "type-2")))
    kfac = cc.KFAC(model, loss, params, data, check_deterministic=False)
    inverse = cola.linalg.inv(kfac + DAMPING * cola.ops.I_like(kfac))
    block(inverse @ v)  # the factors' eigendecompositions happen here, outside the timing
    rows.append(Measurement(KFAC_INVERSE_ROW, "ours", lambda: block(inverse @ v)))
    heuristic = cola.linalg.inv(kfac.damped(DAMPING, mode="heuristic"))
    block(heuristic @ v)
    rows.append(Measurement(KFAC_HEURISTIC_INVERSE_ROW, "ours", lambda: block(heuristic @ v)))
    return rows


def ce_output_hessian_matmat(f: Any, u: Any, softmax: Callable[[Any], Any]) -> Any:
    """Return ``(diag(p) − p pᵀ) u / N`` per example: the mean-CE Hessian w.r.t. the logits."""
    p = softmax(f)
    pu = p * u
    return (pu - p * pu.sum(-1, keepdims=True)) / f.shape[0]


def torch_measurements(name: str) -> list[Measurement]:
    """Return the torch measurements of model ``name``: ours, curvlinops' and plain torch's."""
    import curvlinops

    model, X, y = torch_problem(name)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    v, V = _generator_vectors(sum(p.numel() for p in params))

    def gradient() -> object:
        return torch.autograd.grad(loss_func(model(X), y), params)

    rows = [Measurement("gradient", "plain", gradient)]
    peers = {
        "Hessian": curvlinops.HessianLinearOperator,
        "GGN": curvlinops.GGNLinearOperator,
        "EmpiricalFisher": curvlinops.EFLinearOperator,
        "FisherMC": curvlinops.FisherMCLinearOperator,
    }
    for label, operator in OPERATORS.items():
        ours = operator(model, loss_func, params, data, check_deterministic=False)
        theirs = peers[label](model, loss_func, params, data, check_deterministic=False)
        for impl, op in (("ours", ours), ("curvlinops", theirs)):
            rows.append(Measurement(f"{label} @ v", impl, lambda op=op: op @ v))
            rows.append(Measurement(f"{label} {MATRIX_ROW}", impl, lambda op=op: op @ V, 8))
    rows += _plain_torch(model, loss_func, params, X, y, v, V)

    covered = kfac_params(model)
    kfac_v = torch.randn(
        sum(p.numel() for p in covered), generator=torch.Generator().manual_seed(3)
    )
    rows += kfac_measurements(model, loss_func, covered, data, lambda x: x, kfac_v)
    for fisher_type in FISHER_TYPES:

        def build(fisher_type: str = fisher_type) -> object:
            kfac = curvlinops.KFACLinearOperator(
                model, loss_func, covered, data, fisher_type=fisher_type, check_deterministic=False
            )
            kfac.compute_kronecker_factors()
            return kfac

        rows.append(Measurement(f"KFAC build {fisher_type}", "curvlinops", build))

    def build_ekfac() -> object:
        ekfac = curvlinops.EKFACLinearOperator(
            model, loss_func, covered, data, fisher_type="type-2", check_deterministic=False
        )
        ekfac.compute_eigenvalue_correction()
        return ekfac

    rows.append(Measurement(EKFAC_ROW, "curvlinops", build_ekfac))
    kfac = curvlinops.KFACLinearOperator(
        model, loss_func, covered, data, fisher_type="type-2", check_deterministic=False
    )
    inverse = curvlinops.KFACInverseLinearOperator(kfac, damping=DAMPING, use_exact_damping=True)
    inverse @ kfac_v  # builds and caches the factors and their eigendecompositions
    rows.append(Measurement(KFAC_INVERSE_ROW, "curvlinops", lambda: inverse @ kfac_v))
    heuristic = curvlinops.KFACInverseLinearOperator(
        kfac, damping=DAMPING, use_heuristic_damping=True
    )
    heuristic @ kfac_v
    rows.append(Measurement(KFAC_HEURISTIC_INVERSE_ROW, "curvlinops", lambda: heuristic @ kfac_v))
    for row in rows:
        row.memory = lambda thunk=row.thunk: torch_peak_memory_mib(thunk)
    return rows


def _plain_torch(
    model: nn.Module,
    loss_func: nn.Module,
    params: list[torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    V: torch.Tensor,
) -> list[Measurement]:
    """Return hand-written baselines: double-backward HVP, GGN by ``jvp``/``vjp``, its vmap."""
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in params)
    sizes = [p.numel() for p in params]
    tangent = tuple(t.reshape(p.shape) for t, p in zip(v.split(sizes), params, strict=True))
    tangents = tuple(
        t.T.reshape(NUM_COLUMNS, *p.shape) for t, p in zip(V.split(sizes), params, strict=True)
    )

    def model_fn(*ps: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (X,))

    def softmax(f: torch.Tensor) -> torch.Tensor:
        return f.softmax(-1)

    def hvp() -> object:
        leaves = [p.detach().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(loss_func(model_fn(*leaves), y), leaves, create_graph=True)
        return torch.autograd.grad(grads, leaves, tangent)

    def ggn() -> object:
        f, jv = jvp(model_fn, primals, tangent)
        _, pullback = vjp(model_fn, *primals)
        return pullback(ce_output_hessian_matmat(f, jv, softmax))

    def ggn_matrix() -> object:
        def push(*ts: torch.Tensor) -> torch.Tensor:
            return jvp(model_fn, primals, ts)[1]

        f, pullback = vjp(model_fn, *primals)
        return vmap(pullback)(ce_output_hessian_matmat(f, vmap(push)(*tangents), softmax))

    return [
        Measurement("Hessian @ v", "plain", hvp),
        Measurement("GGN @ v", "plain", ggn),
        Measurement(f"GGN {MATRIX_ROW}", "plain", ggn_matrix, NUM_COLUMNS),
    ]


def jax_measurements(name: str) -> tuple[list[Measurement], str | None]:
    """Return the JAX measurements of model ``name`` (ours and plain ``jax``, all jit).

    The second entry says why the KFAC rows are missing (``None`` when they ran). Peak
    memory is XLA's own account of the compiled program (see ``jax_compiled_mib``).
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    model_fn, params, X, y = jax_problem(name)
    loss = cc.losses.CrossEntropy(reduction="mean")
    data = [(X, y)]
    flat, unravel = ravel_pytree(params)
    v_torch, V_torch = _generator_vectors(flat.size)
    v, V = jnp.asarray(v_torch.numpy()), jnp.asarray(V_torch.numpy())
    tangent = unravel(v)
    tangents = jax.vmap(unravel, in_axes=1)(V)

    def softmax(f: Any) -> Any:
        return jax.nn.softmax(f, axis=-1)

    def loss_fn(p: Any) -> Any:
        logits = model_fn(p, X)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

    def hvp(p: Any, t: Any) -> Any:
        return jax.jvp(jax.grad(loss_fn), (p,), (t,))[1]

    def ggn(p: Any, t: Any) -> Any:
        f, jv = jax.jvp(lambda q: model_fn(q, X), (p,), (t,))
        _, pullback = jax.vjp(lambda q: model_fn(q, X), p)
        return pullback(ce_output_hessian_matmat(f, jv, softmax))[0]

    def ggn_matrix(p: Any, ts: Any) -> Any:
        f, pullback = jax.vjp(lambda q: model_fn(q, X), p)
        jv = jax.vmap(lambda t: jax.jvp(lambda q: model_fn(q, X), (p,), (t,))[1])(ts)
        return jax.vmap(pullback)(ce_output_hessian_matmat(f, jv, softmax))[0]

    def plain(row: str, fn: Callable, *args: Any, columns: int = 1) -> Measurement:
        jitted = jax.jit(fn)
        return Measurement(
            row,
            "plain",
            lambda: jax.block_until_ready(jitted(*args)),
            columns,
            lambda: jax_compiled_mib(jitted, *args),
        )

    rows = [
        plain("gradient", jax.grad(loss_fn), params),
        plain("Hessian @ v", hvp, params, tangent),
        plain("GGN @ v", ggn, params, tangent),
        plain(f"GGN {MATRIX_ROW}", ggn_matrix, params, tangents, columns=NUM_COLUMNS),
    ]
    for label, operator in OPERATORS.items():
        op = operator(model_fn, loss, params, data, check_deterministic=False)

        def traced(p: Any, x: Any, t: Any, u: Any, operator: type = operator) -> Any:
            built = operator(
                model_fn, loss, p, [(x, t)], check_deterministic=False, num_data=len(t)
            )
            return built @ u

        for row, w, k in ((f"{label} @ v", v, 1), (f"{label} {MATRIX_ROW}", V, NUM_COLUMNS)):
            rows.append(
                Measurement(
                    row,
                    "ours",
                    lambda op=op, w=w: jax.block_until_ready(op @ w),
                    k,
                    lambda traced=traced, w=w: jax_compiled_mib(jax.jit(traced), params, X, y, w),
                )
            )
    try:
        rows += _jax_kfac(name, model_fn, loss, params, data)
    except NotImplementedError as error:
        return rows, f"{type(error).__name__}: {error}"
    return rows, None


def _jax_kfac(name: str, model_fn: Callable, loss: Any, params: dict, data: list) -> list:
    """Return our KFAC rows on the JAX model (only its ``Linear``/``Conv2d`` parameters)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    model, _, _ = torch_problem(name)
    covered_ids = {id(p) for p in kfac_params(model)}
    covered = {key for key, p in model.named_parameters() if id(p) in covered_ids}
    fixed = {key: value for key, value in params.items() if key not in covered}
    subset = {key: value for key, value in params.items() if key in covered}

    def kfac_model_fn(p: dict, x: Any) -> Any:
        return model_fn({**fixed, **p}, x)

    size = ravel_pytree(subset)[0].size
    v = jnp.asarray(torch.randn(size, generator=torch.Generator().manual_seed(3)).numpy())
    return kfac_measurements(kfac_model_fn, loss, subset, data, jax.block_until_ready, v)


def jax_compiled_mib(jitted: Any, *args: Any) -> float:
    """Return the temporary plus output bytes XLA assigns to the compiled program, in MiB.

    ``Compiled.memory_analysis()`` is XLA's buffer assignment: the live set of the program's
    own buffers (arguments excluded), computed at compile time, not a measured peak.
    """
    stats = jitted.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def _profiler_nodes(nodes: list) -> list:
    """Return all nodes of the profiler's event tree, depth first."""
    result = []
    for node in nodes:
        result.append(node)
        result.extend(_profiler_nodes(node.children))
    return result


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ library logs each start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _FlopCount(TorchDispatchMode):
    """Count the floating-point operations of the matrix products and convolutions run."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def torch_flops(thunk: Callable[[], object]) -> int:
    """Return the FLOPs of one call's matrix products and convolutions (an arithmetic floor).

    Counted below autograd and ``vmap`` with the formulas of ``torch.utils.flop_counter``
    (``mm``, ``bmm``, ``addmm``, convolutions and their backward, attention kernels), so
    every kernel the call runs is seen with the shapes it runs at; element-wise work,
    reductions and ``eigh`` are not counted. (``FlopCounterMode`` itself cannot be used: its
    module hooks break ``autograd.grad`` inside ``vmap``.)
    """
    with _FlopCount() as counter:
        thunk()
    return counter.total


def torch_peak_memory_mib(thunk: Callable[[], object]) -> float | None:
    """Return the peak of the bytes allocated (net of frees) during one call, in MiB.

    Read from the allocation events of ``torch.profiler`` (``profile_memory=True``), which
    see every allocation of torch's CPU allocator, whatever was allocated before the call;
    ``None`` if this torch lacks them.
    """
    try:
        from torch._C._profiler import _EventType

        profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        with _quiet_stderr(), profiler as prof:
            thunk()
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError, RuntimeError):
        return None
    events = sorted(
        (node.start_time_ns, node.typed[1].alloc_size)
        for node in _profiler_nodes(tree)
        if node.typed[0] == _EventType.Allocation
    )
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak / 2**20
