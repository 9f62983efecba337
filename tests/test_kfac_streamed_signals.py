"""Streamed output gradients (one column per chunk) give the statistics of stacked ones."""

import pytest
import torch

from cola_curvature.backends.torch.call_signals import _segment_sum
from cola_curvature.kfac_statistics.moments import (
    LayerSignals,
    TokenInputs,
    batch_eigencorrections,
    batch_statistics,
)
from cola_curvature.options import KFACApprox
from tests.cases import F64


def _signals() -> tuple[dict, dict]:
    """Return inputs and stacked ``(C', N, T, out)`` output gradients of two layers."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 6, (4, 5), generator=generator)
    inputs = {
        "dense": torch.randn(4, 5, 3, generator=generator, dtype=F64),
        "tokens": TokenInputs(tokens, torch.ones(4, 5, dtype=F64), 6, _segment_sum),
    }
    grads = {
        "dense": torch.randn(3, 4, 5, 2, generator=generator, dtype=F64),
        "tokens": torch.randn(3, 4, 5, 2, generator=generator, dtype=F64),
    }
    return inputs, grads


def _streamed(inputs: dict, grads: dict) -> LayerSignals:
    """Return the signals with their gradients as a one-shot stream of single columns."""
    columns = ({name: g[c : c + 1] for name, g in grads.items()} for c in range(3))
    return LayerSignals(inputs, None, 0.5, columns)


@pytest.mark.parametrize("approx", list(KFACApprox))
def test_streamed_columns_give_the_stacked_factor_statistics(approx):
    inputs, grads = _signals()
    stacked = batch_statistics(LayerSignals(inputs, grads, 0.5), approx)
    streamed = batch_statistics(_streamed(inputs, grads), approx)
    for name in grads:
        torch.testing.assert_close(streamed.output_moments[name], stacked.output_moments[name])
        torch.testing.assert_close(streamed.input_moments[name], stacked.input_moments[name])
    summed = grads["dense"].sum(2) if approx is KFACApprox.REDUCE else grads["dense"]
    dense = summed.reshape(-1, 2)
    expected = 0.5 * dense.T @ dense
    torch.testing.assert_close(streamed.output_moments["dense"], expected)


def test_streamed_columns_give_the_stacked_eigencorrections():
    inputs, grads = _signals()
    generator = torch.Generator().manual_seed(4)
    q_out = torch.linalg.qr(torch.randn(2, 2, generator=generator, dtype=F64))[0]
    q_in = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=F64))[0]
    bases = {"dense": (q_out, q_in), "tokens": (q_out, None)}
    stacked = batch_eigencorrections(LayerSignals(inputs, grads, 0.5), bases)
    streamed = batch_eigencorrections(_streamed(inputs, grads), bases)
    for name in grads:
        torch.testing.assert_close(streamed[name], stacked[name])
    per_example = torch.einsum("cnto,ntk->cnok", grads["dense"] @ q_out, inputs["dense"] @ q_in)
    torch.testing.assert_close(streamed["dense"], 0.5 * (per_example**2).sum((0, 1)))
