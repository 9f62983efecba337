"""Symmetry-averaged curvature: gradient outer products averaged over weight-space symmetries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cola.backends import get_library_fns

from cola_curvature.operators._bound import DataBound
from cola_curvature.operators._data import CurvatureData
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.parameter_kronecker import ParameterKroneckerFactored
from cola_curvature.operators.symmetry_blocks import averaged_block, gradient_statistics
from cola_curvature.options import SymmetryGroup, parse_option
from cola_curvature.types import Array


@dataclass(frozen=True)
class Transposed:
    """A parameter whose *columns* (its second axis) belong to the block's rows.

    ``cc.Transposed("2.weight")`` in a group key puts the next layer's incoming weights of
    each hidden unit into that unit's row (see :class:`SymmetryCurvature`).
    """

    name: str


#: A block member: the position in ``params`` and whether it enters transposed.
Member = tuple[int, bool]
#: A block of the partition: its members and its group.
Part = tuple[tuple[Member, ...], SymmetryGroup]


def _rows_first(array: Array, transposed: bool) -> Array:
    """Return ``array`` as ``(rows, rest)``: its first axis, or its second when transposed."""
    if array.ndim == 0:
        return array.reshape(1, 1)
    if transposed:
        if array.ndim < 2:
            raise ValueError(
                f"a transposed member needs 2 or more axes, got shape {tuple(array.shape)}."
            )
        array = get_library_fns(array.dtype).moveaxis(array, 1, 0)
    return array.reshape(array.shape[0], -1)


def matrix_view(gradients: Sequence[Array], transposed: Sequence[bool] | None = None) -> Array:
    """Return ``[P_1 | P_2 | …]``: each parameter as ``(rows, rest)``, side by side.

    A weight ``(m, n)`` is itself, a convolution kernel ``(m, c, h, w)`` is ``(m, c h w)``,
    a bias ``(m,)`` is a column ``(m, 1)``, a scalar is ``(1, 1)``; a transposed member
    ``(p, m, …)`` contributes its second axis as rows, ``(m, p …)``. Listing a layer's
    weight and bias together makes a hidden unit's row ``[w_i | b_i]``, on which the row
    groups act jointly, as permuting hidden units does.
    """
    transposed = transposed or [False] * len(gradients)
    xnp = get_library_fns(gradients[0].dtype)
    views = [_rows_first(g, t) for g, t in zip(gradients, transposed, strict=True)]
    return xnp.concat(views, axis=1)


def _partition(names: Sequence[str], groups: Any) -> list[Part]:
    """Return the blocks: every parameter alone for a string, the mapping's keys otherwise."""
    if isinstance(groups, (str, SymmetryGroup)):
        group = parse_option(SymmetryGroup, groups, "symmetry group")
        return [(((i, False),), group) for i in range(len(names))]
    if not isinstance(groups, Mapping):
        raise TypeError(
            "groups must be a group name such as 'orthogonal-rows', or a dict from a parameter "
            f"name (or a tuple of names, e.g. a weight and its bias) to a group; got "
            f"{type(groups).__name__}."
        )
    index = {name: i for i, name in enumerate(names)}
    parts, seen = [], []
    for key, value in groups.items():
        entries = (key,) if isinstance(key, (str, Transposed)) else tuple(key)
        members = [(e.name, True) if isinstance(e, Transposed) else (e, False) for e in entries]
        unknown = [name for name, _ in members if name not in index]
        if unknown:
            raise ValueError(f"groups names {unknown}, which are not in params {list(names)}.")
        group = parse_option(SymmetryGroup, value, "symmetry group")
        parts.append((tuple((index[name], t) for name, t in members), group))
        seen += [index[name] for name, _ in members]
    repeated = sorted({names[i] for i in seen if seen.count(i) > 1})
    missing = [names[i] for i in range(len(names)) if i not in seen]
    if repeated or missing:
        raise ValueError(
            f"groups must name every parameter exactly once; repeated: {repeated}, "
            f"missing: {missing}."
        )
    return parts


class SymmetryCurvature(DataBound, ParameterKroneckerFactored):
    r"""``C = P · ⊕_b E_h[ρ_b(h) g_b g_bᵀ ρ_b(h)ᵀ] · Pᵀ``: gradients averaged over symmetries.

    Each block ``b`` is one parameter, or several listed together (a layer's weight and
    bias), seen as an ``m × n`` matrix (:func:`matrix_view`) with gradient ``G_b``; its
    group's average of ``vec(G_b) vec(G_b)ᵀ`` has the closed form derived in
    :mod:`cola_curvature.operators.symmetry_blocks`: ``I ⊗ GᵀG/m`` (orthogonal rows),
    ``GGᵀ/n ⊗ I`` (orthogonal columns), ``‖G‖²/(mn) I`` (both), ``I ⊗ A + 11ᵀ ⊗ B``
    (permuted rows). Every rule of :class:`~cola_curvature.KroneckerFactored` applies:
    ``inv``, ``logdet``, ``eig``, ``sqrt``/``isqrt``, ``trace``, ``diag`` and damping are
    exact and never dense.

    Hidden units across two layers: permuting the ``m`` hidden units of
    ``h = σ(W_l x + b_l)``, ``y = W_{l+1} h`` maps ``W_l → ΠW_l``, ``b_l → Πb_l`` and
    ``W_{l+1} → W_{l+1}Πᵀ`` and leaves the network's function unchanged (``σ`` acts
    entrywise). Unit ``i`` owns the row ``z_i = [W_l,i | b_l,i | (W_{l+1})_{:,i}ᵀ]`` of
    ``Z = [W_l | b_l | W_{l+1}ᵀ]`` and ``Π`` permutes the rows of ``Z``, so the joint,
    cross-layer average is the row-permutation average of ``Z``'s gradient —
    ``I ⊗ A + 11ᵀ ⊗ B`` with ``A``, ``B`` of size ``(n + 1 + p)²`` coupling both layers — with
    ``W_{l+1}`` entering transposed: ``groups={("0.weight", "0.bias",
    cc.Transposed("2.weight")): "permutation-rows", "2.bias": ...}``. Each parameter sits in
    one block, so in a deeper MLP the joint blocks cover every other hidden layer (the
    average over all layers' permutations at once couples every layer and is not built).

    The gradient: with ``ema=None``, the gradient ``g = ∇_θ L`` of the empirical risk over
    all of ``data`` (one outer product). With ``ema=β``, each batch's own gradient
    ``g_t`` (its loss reduced as if it were the whole data set) enters an exponential
    moving average of the statistics, ``M_t = β M_{t−1} + (1 − β) stat(g_t)``, debiased by
    ``1 − β^T`` after ``T`` batches — averages are linear in ``g gᵀ``, so this is the
    group average of the moving average of ``g_t g_tᵀ``.

    Cost: one gradient per batch, then per block ``O(m n² + n³)`` (rows, permutation)
    or ``O(m² n + m³)`` (columns). Annotation: ``PSD``.

    Args:
        model: A ``torch.nn.Module`` or a JAX ``model_fn(params, x)``.
        loss_func: As for :class:`~cola_curvature.GGN`.
        params: The parameters (torch list, or JAX pytree).
        data: A re-iterable of ``(X, y)`` batches.
        groups: One group for every parameter separately (``"orthogonal-rows"``,
            ``"orthogonal-cols"``, ``"orthogonal-both"``, ``"permutation-rows"``), or a
            dict from a parameter name (``backend.layout.names``: ``"0.weight"`` for torch,
            ``"['w1']"`` for a JAX dict) or a tuple of names sharing their rows to a group;
            ``cc.Transposed(name)`` in a tuple contributes that parameter's columns.
        ema: ``None`` (full-data gradient) or ``β ∈ [0, 1)`` (moving average over batches).
        **data_options: ``num_data``, ``batch_size_fn``, ``check_deterministic``,
            ``progressbar``, ``distributed`` (the gradient is summed over the ranks), as for
            every data-bound operator (:class:`~cola_curvature.operators._bound.DataBound`).

    """

    def __init__(
        self,
        model: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[tuple[Any, Any]],
        groups: str | Mapping[Any, str] = "orthogonal-rows",
        *,
        ema: float | None = None,
        **data_options: Any,
    ) -> None:
        if ema is not None and not 0 <= ema < 1:
            raise ValueError(f"ema must be None or in [0, 1), got {ema!r}.")
        if ema is not None and data_options.get("distributed", False):
            raise ValueError(
                "ema orders the batches in time, which shards on several ranks do not have; "
                "use ema=None with distributed=True (the full-data gradient)."
            )
        self._bind(model, loss_func, params, data, **data_options)
        self._loss = self._backend.loss
        data = self._data
        self.ema = ema
        self.parts = _partition(self._backend.layout.names, groups)
        statistics, shapes = self._statistics(data)
        blocks = [
            averaged_block(group, stats, shape)
            for (_, group), stats, shape in zip(self.parts, statistics, shapes, strict=True)
        ]
        KroneckerFactored.__init__(self, blocks, self._permutation(blocks[0]))

    def _data_risk(self, f: Array, y: Array) -> Array:
        """Return ``R Σ_{n ∈ batch} ℓ(f_n, y_n)`` with ``R`` of the whole data set."""
        self._loss.check_target(f, y)
        return self._loss.scale(f, self.num_data) * self._loss.sum_value(f, y)

    def _batch_risk(self, f: Array, y: Array) -> Array:
        """Return the batch's loss reduced as if the batch were the whole data set."""
        self._loss.check_target(f, y)
        return self._loss.scale(f, f.shape[0]) * self._loss.sum_value(f, y)

    def _statistics(self, data: CurvatureData) -> tuple[list[tuple[Array, ...]], list[tuple]]:
        """Return each block's averaged statistics and matrix shape."""
        backend = self._backend
        with backend.preserved_state():
            if self.ema is None:
                total = None
                for batch in data.batches("gradient"):
                    part = backend.gradient(batch, self._data_risk)
                    total = (
                        part if total is None else [t + p for t, p in zip(total, part, strict=True)]
                    )
                weighted = [(1.0, [data.combine(t) for t in total])]
            else:
                weighted, count = [], 0
                for batch in data.batches("gradients"):
                    weighted.append(((1 - self.ema), backend.gradient(batch, self._batch_risk)))
                    count += 1
                decay = [self.ema ** (count - 1 - t) for t in range(count)]
                normaliser = 1 - self.ema**count
                weighted = [
                    (w * d / normaliser, g) for (w, g), d in zip(weighted, decay, strict=True)
                ]
        self._gradient_shapes = [tuple(g.shape) for g in weighted[0][1]]
        statistics, shapes = [], []
        for members, group in self.parts:
            first = weighted[0][1]
            check_rows(
                [_rows_first(first[i], t).shape[0] for i, t in members],
                [backend.layout.names[i] for i, _ in members],
            )
            summed = None
            for weight, gradient in weighted:
                G = matrix_view([gradient[i] for i, _ in members], [t for _, t in members])
                stats = [weight * s for s in gradient_statistics(group, G)]
                summed = (
                    stats if summed is None else [a + b for a, b in zip(summed, stats, strict=True)]
                )
            statistics.append(tuple(summed))
            shapes.append(tuple(G.shape))
        return statistics, shapes

    def _permutation(self, reference: Any) -> Array:
        """Return the user-order position of every block-order coordinate (row-major blocks)."""
        xnp, device = reference.xnp, reference.device
        sizes, offsets = self._backend.layout.sizes, self._backend.layout.offsets
        parts = []
        for members, _ in self.parts:
            grids = [
                offsets[i] + xnp.arange(sizes[i], device=device).reshape(self._gradient_shapes[i])
                for i, _ in members
            ]
            parts.append(matrix_view(grids, [t for _, t in members]).reshape(-1))
        return xnp.concat(parts, axis=0)


def check_rows(rows: Sequence[int], names: Sequence[str]) -> None:
    """Raise ``ValueError`` unless parameters listed together have the same number of rows."""
    if len(set(rows)) > 1:
        raise ValueError(
            f"parameters {list(names)} are listed together but have {list(rows)} rows; a "
            "block's members must share their rows (a weight and its bias; the next layer's "
            "weight as cc.Transposed(name))."
        )


__all__ = ["SymmetryCurvature", "Transposed", "matrix_view"]
