"""Replay of a jaxpr that taps the layers' inputs and perturbs their outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal, Var

from cola_curvature.backends.jax.jaxpr_sites import Path, Site, _nested
from cola_curvature.types import Array


def replay(
    closed: ClosedJaxpr,
    args: Sequence[Array],
    sites: Sequence[Site],
    deltas: Sequence[Array],
) -> tuple[list[Array], list[Array]]:
    """Evaluate ``closed`` on ``args``, adding ``deltas[k]`` to site ``k``'s output.

    Returns the jaxpr's outputs and each site's input activation. Nested jaxprs are
    replayed only where they contain a site; everything else is bound as traced.
    """
    taps = {site.op_path: k for k, site in enumerate(sites)}
    perturbations = {site.output_path: k for k, site in enumerate(sites)}
    prefixes = {path[:d] for path in (*taps, *perturbations) for d in range(1, len(path))}
    recorded: list[Array] = [None] * len(sites)

    def evaluate(jaxpr: Jaxpr, consts: Sequence[Array], values: Sequence[Array], path: Path):
        env: dict[Var, Array] = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, values, strict=True))

        def read(var: Any) -> Array:
            return var.val if isinstance(var, Literal) else env[var]

        for i, eqn in enumerate(jaxpr.eqns):
            here = path + (i,)
            ins = [read(v) for v in eqn.invars]
            if here in taps:
                recorded[taps[here]] = ins[sites[taps[here]].activation]
            if here in prefixes:
                inner, inner_consts = _nested(eqn)
                outs = evaluate(inner, inner_consts, ins, here)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            if here in perturbations:
                outs = [outs[0] + deltas[perturbations[here]]]
            env.update(
                (v, o) for v, o in zip(eqn.outvars, outs, strict=True) if not isinstance(v, DropVar)
            )
        return [read(v) for v in jaxpr.outvars]

    outputs = evaluate(closed.jaxpr, closed.consts, args, ())
    return outputs, recorded
