"""Dense, convolution and embedding layers found in the jaxpr of a ``model_fn``.

A layer is a ``dot_general`` or ``conv_general_dilated`` whose weight operand is a parameter
leaf (possibly rearranged by ``transpose``/``reshape``), optionally followed by an ``add`` of
a bias leaf (possibly through ``broadcast_in_dim``/``reshape``/``squeeze``) along the output
features, possibly after ``transpose``s of the output (``jax.vmap`` of a per-example
``W @ x + b`` computes ``(W @ xᵀ)ᵀ + b``). An embedding is a ``gather`` of whole rows of a
2-D leaf (``W[x]``, see :mod:`~cola_curvature.backends.jax.jaxpr_embeddings`), without a
bias. Calls of nested jaxprs (``jit``, ``closed_call``, ``checkpoint``) are followed; every
other primitive that consumes a leaf (including ``custom_jvp_call``, ``scan``, elementwise
maths, any other ``gather``) is a use of that leaf outside any layer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend.core import DropVar, Jaxpr, JaxprEqn, Literal

from cola_curvature.backends.jax.jaxpr_embeddings import clamps_indices, gathers_rows
from cola_curvature.backends.jax.jaxpr_sites import Path, Site, _nested

_REARRANGEMENTS = frozenset({"transpose", "reshape", "broadcast_in_dim", "squeeze"})
_DENSE_USE = "a dot_general (dense layer)"
_CONV_USE = "a conv_general_dilated (convolution layer)"
_EMBEDDING_USE = "a gather of whole rows (embedding layer)"
_BIAS_USE = "a bias add"
_LAYER_USES = frozenset({_DENSE_USE, _CONV_USE, _EMBEDDING_USE, _BIAS_USE})


@dataclass
class _Leaf:
    """A value made of the entries of leaf ``leaf``: ``index`` holds their flat positions."""

    leaf: int
    index: np.ndarray


@dataclass
class _Output:
    """A value that is the output of ``site`` (``biased`` once its bias has been added).

    An embedding's output is ``biased`` from the start: it takes no bias, as torch's
    ``F.embedding``. ``permutation[k]`` is the axis of the op's output that axis ``k`` of
    this value is (``None``: the op's output itself).
    """

    site: Site
    biased: bool
    permutation: tuple[int, ...] | None = None

    @property
    def feature_axis(self) -> int:
        """Return the axis of this value that runs over the layer's output features."""
        if self.permutation is None:
            return self.site.out_axis
        return self.permutation.index(self.site.out_axis)


def _rearranged(eqn: JaxprEqn, index: np.ndarray) -> np.ndarray | None:
    """Return the leaf positions after a rearranging primitive, or ``None`` if unsupported."""
    name, params = eqn.primitive.name, eqn.params
    if name == "transpose":
        return np.transpose(index, params["permutation"])
    if name == "reshape" and params.get("dimensions") is None:
        return index.reshape(params["new_sizes"])
    if name == "squeeze":
        return np.squeeze(index, axis=tuple(params["dimensions"]))
    if name == "broadcast_in_dim":
        shape = [1] * len(params["shape"])
        for axis, size in zip(params["broadcast_dimensions"], index.shape, strict=True):
            shape[axis] = size
        return np.broadcast_to(index.reshape(shape), params["shape"])
    return None


def _is_permutation(index: np.ndarray, size: int) -> bool:
    """Return whether ``index`` holds every position ``0 … size-1`` exactly once.

    ``index`` comes from ``arange(size)`` through transposes and reshapes (bijections) and
    ``broadcast_in_dim``/``squeeze``, which only ever add or drop copies: it holds every
    position once exactly when no copies were added, i.e. when its size is ``size``.
    """
    return index.size == size


def _bias_along(index: np.ndarray, shape: tuple[int, ...], axis: int, size: int) -> bool:
    """Return whether ``index`` broadcast to ``shape`` is ``0 … size-1`` along ``axis`` only."""
    if size != shape[axis] or index.ndim > len(shape):
        return False
    aligned = index.reshape((1,) * (len(shape) - index.ndim) + index.shape)
    vector = [1] * len(shape)
    vector[axis] = size
    expected = np.arange(size).reshape(vector)
    if aligned.shape == tuple(vector):  # the usual case: no copies along the other axes
        return np.array_equal(aligned, expected)
    try:
        full = np.broadcast_to(aligned, shape)
    except ValueError:
        return False
    return np.array_equal(full, np.broadcast_to(expected, shape))


class LayerSearch:
    """Walk a jaxpr once, recording layer sites and every use of every parameter leaf.

    Args:
        names: Key path of each leaf, for error messages.
        sizes: Number of entries of each leaf.

    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        self.names, self.sizes = list(names), list(sizes)
        self.sites: list[Site] = []
        self.uses: dict[int, list[str]] = defaultdict(list)

    def run(self, jaxpr: Jaxpr) -> None:
        """Analyse ``jaxpr`` whose first ``len(names)`` inputs are the leaves."""
        leaves = [
            _Leaf(i, np.arange(size).reshape(var.aval.shape))
            for i, (size, var) in enumerate(zip(self.sizes, jaxpr.invars, strict=False))
        ]
        inputs = leaves + [None] * (len(jaxpr.invars) - len(leaves))
        for origin in self._walk(jaxpr, inputs, ()):
            if isinstance(origin, _Leaf):
                self.uses[origin.leaf].append("returned by model_fn")

    def _walk(self, jaxpr: Jaxpr, inputs: list[Any], path: Path) -> list[Any]:
        """Propagate origins through one jaxpr; return the origins of its outputs."""
        origin = {v: o for v, o in zip(jaxpr.invars, inputs, strict=True) if o is not None}
        counts = Counter(
            v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, Literal)
        ) + Counter(v for v in jaxpr.outvars if not isinstance(v, Literal))
        for i, eqn in enumerate(jaxpr.eqns):
            ins = [None if isinstance(v, Literal) else origin.get(v) for v in eqn.invars]
            outs = self._equation(eqn, ins, path + (i,), counts)
            for var, out in zip(eqn.outvars, outs, strict=True):
                if out is not None and not isinstance(var, DropVar):
                    origin[var] = out
        results = []
        for var in jaxpr.outvars:
            out = None if isinstance(var, Literal) else origin.get(var)
            shared = isinstance(out, _Output) and counts[var] > 1
            results.append(None if shared else out)
        return results

    def _equation(self, eqn: JaxprEqn, ins: list[Any], here: Path, counts: Counter) -> list[Any]:
        """Return the origins of one equation's outputs, recording layers and leaf uses."""
        nested = _nested(eqn)
        if nested is not None:
            # a layer output used elsewhere too cannot take a bias inside the call
            ins = [
                None if isinstance(o, _Output) and counts[v] != 1 else o
                for o, v in zip(ins, eqn.invars, strict=True)
            ]
            return self._walk(nested[0], ins, here)
        name = eqn.primitive.name
        if name in _REARRANGEMENTS and isinstance(ins[0], _Leaf):
            index = _rearranged(eqn, ins[0].index)
            if index is not None:
                return [_Leaf(ins[0].leaf, index)]
        found = None
        if name == "transpose":
            found = self._transposed(eqn, ins, counts)
        elif name == "dot_general":
            found = self._dense(eqn, ins, here)
        elif name == "conv_general_dilated":
            found = self._conv(eqn, ins, here)
        elif name == "gather":
            found = self._embedding(eqn, ins, here)
        elif name == "add":
            found = self._bias(eqn, ins, here, counts)
        if found is not None:
            return [found]
        for origin in ins:
            if isinstance(origin, _Leaf):
                self.uses[origin.leaf].append(name)
        return [None] * len(eqn.outvars)

    def _weight(self, origin: Any) -> bool:
        """Return whether ``origin`` is a whole leaf, rearranged but not repeated."""
        return isinstance(origin, _Leaf) and _is_permutation(origin.index, self.sizes[origin.leaf])

    def _dense(self, eqn: JaxprEqn, ins: list[Any], here: Path) -> _Output | None:
        """Recognise ``activation · W`` contracting one axis, without batch dimensions."""
        (contracting, batch) = eqn.params["dimension_numbers"]
        if any(batch) or len(contracting[0]) != 1:
            return None
        for weight in (1, 0):
            activation = 1 - weight
            leaf = ins[weight]
            if not self._weight(leaf) or leaf.index.ndim != 2:
                continue
            if isinstance(ins[activation], _Leaf):
                return None
            ndim = eqn.invars[activation].aval.ndim
            if ndim < 2:
                raise ValueError(
                    f"params leaf {self.names[leaf.leaf]} multiplies an input of shape "
                    f"{eqn.invars[activation].aval.shape} without an example axis; KFAC "
                    "needs layer inputs whose leading free axis runs over examples."
                )
            w_contracting = contracting[weight][0]
            grid = np.moveaxis(leaf.index, (1 - w_contracting, w_contracting), (0, 1))
            site = Site(
                kind="dense",
                weight=leaf.leaf,
                weight_positions=grid,
                op_path=here,
                output_path=here,
                activation=activation,
                out_axis=ndim - 1 if activation == 0 else 0,
                output_aval=eqn.outvars[0].aval,
                contracting=contracting[activation][0],
            )
            return self._add_site(site, _DENSE_USE)
        return None

    def _conv(self, eqn: JaxprEqn, ins: list[Any], here: Path) -> _Output | None:
        """Recognise ``conv_general_dilated(activation, W)``; reject grouped/transposed ones."""
        lhs, rhs = ins
        if not self._weight(rhs) or isinstance(lhs, _Leaf):
            return None
        params = eqn.params
        groups = (params["feature_group_count"], params["batch_group_count"])
        if groups != (1, 1) or any(d != 1 for d in params["lhs_dilation"]):
            raise ValueError(
                f"params leaf {self.names[rhs.leaf]} is the kernel of a convolution with "
                f"feature_group_count={groups[0]}, batch_group_count={groups[1]}, "
                f"lhs_dilation={tuple(params['lhs_dilation'])}; KFAC supports convolutions "
                "with all of them 1 (no grouped, depthwise or transposed convolutions)."
            )
        numbers = params["dimension_numbers"]
        kernel = np.transpose(rhs.index, numbers.rhs_spec)  # (out, in, *filter)
        canonical = jax.lax.ConvDimensionNumbers(
            numbers.lhs_spec, tuple(range(kernel.ndim)), numbers.out_spec
        )
        site = Site(
            kind="conv",
            weight=rhs.leaf,
            weight_positions=kernel.reshape(kernel.shape[0], -1),
            op_path=here,
            output_path=here,
            activation=0,
            out_axis=numbers.out_spec[1],
            output_aval=eqn.outvars[0].aval,
            conv={
                "filter_shape": kernel.shape[2:],
                "window_strides": tuple(params["window_strides"]),
                "padding": tuple(map(tuple, params["padding"])),
                "rhs_dilation": tuple(params["rhs_dilation"]),
                "dimension_numbers": canonical,
            },
        )
        return self._add_site(site, _CONV_USE)

    def _embedding(self, eqn: JaxprEqn, ins: list[Any], here: Path) -> _Output | None:
        """Recognise ``W[x]``: a ``gather`` of whole rows of a 2-D leaf ``W`` at indices ``x``."""
        table, indices = ins
        if not self._weight(table) or isinstance(indices, _Leaf) or not gathers_rows(eqn):
            return None
        site = Site(
            kind="embedding",
            weight=table.leaf,
            weight_positions=table.index.T,  # the block is on Wᵀ: (d, V)
            op_path=here,
            output_path=here,
            activation=1,
            out_axis=eqn.outvars[0].aval.ndim - 1,
            output_aval=eqn.outvars[0].aval,
            clip_indices=clamps_indices(eqn),
        )
        return self._add_site(site, _EMBEDDING_USE)

    def _add_site(self, site: Site, use: str) -> _Output:
        """Record a new layer site and its weight's use."""
        self.sites.append(site)
        self.uses[site.weight].append(use)
        return _Output(site, biased=site.kind == "embedding")

    def _transposed(self, eqn: JaxprEqn, ins: list[Any], counts: Counter) -> _Output | None:
        """Follow an unbiased layer output (used only here) through a ``transpose``."""
        output = ins[0]
        if not isinstance(output, _Output) or output.biased or counts[eqn.invars[0]] != 1:
            return None
        before = output.permutation or tuple(range(eqn.invars[0].aval.ndim))
        after = tuple(before[axis] for axis in eqn.params["permutation"])
        return _Output(output.site, biased=False, permutation=after)

    def _bias(self, eqn: JaxprEqn, ins: list[Any], here: Path, counts: Counter) -> Any:
        """Recognise ``layer output + b`` with ``b`` a leaf laid along the output features.

        The output may have been transposed since the op (:meth:`_transposed`): the bias
        must lie along the axis that the op's output features moved to.
        """
        for position in (0, 1):
            output, bias = ins[position], ins[1 - position]
            var = eqn.invars[position]
            if not (isinstance(output, _Output) and isinstance(bias, _Leaf)) or output.biased:
                continue
            site, shape = output.site, tuple(var.aval.shape)
            if counts[var] != 1 or tuple(eqn.outvars[0].aval.shape) != shape:
                continue
            if _bias_along(bias.index, shape, output.feature_axis, self.sizes[bias.leaf]):
                site.bias, site.output_path = bias.leaf, here
                site.output_permutation = output.permutation
                site.output_aval = eqn.outvars[0].aval
                self.uses[bias.leaf].append(_BIAS_USE)
                return _Output(site, biased=True)
        return None

    def owned_sites(self) -> list[Site]:
        """Return the sites whose leaves no operation outside a layer uses.

        A weight several layers use (an lm-head tied to a token embedding: one embedding
        ``gather`` and one ``dot_general`` of the same leaf; a layer applied twice) keeps
        all its sites: the KFAC backend gives them one shared block. A leaf any other
        operation uses too (``jnp.tanh(W)``, a column gather) is no Kronecker layer's: its
        sites are dropped and it stays uncovered, as in the torch backend.
        """
        return [
            site
            for site in self.sites
            if all(
                use in _LAYER_USES
                for leaf in (site.weight, site.bias)
                if leaf is not None
                for use in self.uses[leaf]
            )
        ]


def find_sites(jaxpr: Jaxpr, names: Sequence[str], sizes: Sequence[int]) -> list[Site]:
    """Return the layer sites of ``jaxpr`` that own their leaves, in program order."""
    search = LayerSearch(names, sizes)
    search.run(jaxpr)
    return search.owned_sites()
