"""KFAC rebuilt on one model: what later builds reuse, and that a changed model is found anew.

Reused: the block permutations of an unchanged layout and the backend's dispatch per
argument types; the layers are found anew on every build (a model's forward may branch on
state no key can see). Every build is checked against the dense GGN blocks of a deep linear
network with MSE, where type-2 KFAC is exact.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cola_curvature as cc
from cola_curvature.backends import curvature_backend as memoised_backend
from cola_curvature.backends import dispatch
from cola_curvature.backends.torch.backend import TorchBackend
from cola_curvature.kfac_statistics.shared_weights import SharedWeightLayer
from tests._tols import EXACT_RTOL
from tests.reference import dense_ggn

F64 = torch.float64


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def deep_linear(widths=(3, 4, 4, 2), seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=False)]
    model = nn.Sequential(*layers).to(F64)
    X = torch.randn(6, widths[0], dtype=F64)
    y = torch.randn(6, widths[-1], dtype=F64)
    return model, [(X[:4], y[:4]), (X[4:], y[4:])]


def block_mask(params, groups):
    """1 where both coordinates belong to parameters of the same group, else 0."""
    group = {id(p): g for g, members in enumerate(groups) for p in members}
    labels = torch.cat([torch.full((p.numel(),), group[id(p)]) for p in params])
    return (labels[:, None] == labels[None, :]).to(F64)


def layer_groups(model):
    return [list(module.parameters()) for module in model if list(module.parameters())]


def check_exact(kfac, model, params, data, groups):
    """KFAC equals the GGN restricted to the blocks of ``groups`` (exact: deep linear + MSE)."""
    loss = nn.MSELoss()
    expected = dense_ggn(model, loss, params, data) * block_mask(params, groups)
    assert relative_error(kfac.to_dense(), expected) < EXACT_RTOL


def test_rebuild_reuses_permutations_and_stays_exact():
    model, data = deep_linear()
    params = list(model.parameters())
    first = cc.KFAC(model, nn.MSELoss(), params, data)
    second = cc.KFAC(model, nn.MSELoss(), params, data)
    assert second.permutation is first.permutation
    assert second.inverse_permutation is first.inverse_permutation
    for kfac in (first, second):
        check_exact(kfac, model, params, data, layer_groups(model))


def test_other_parameter_order_gets_its_own_permutation():
    model, data = deep_linear(seed=1)
    params = list(model.parameters())
    cc.KFAC(model, nn.MSELoss(), params, data)
    shuffled = [params[i] for i in (3, 0, 5, 2, 4, 1)]
    kfac = cc.KFAC(model, nn.MSELoss(), shuffled, data)
    check_exact(kfac, model, shuffled, data, layer_groups(model))


def test_separated_after_joint_on_the_same_model():
    model, data = deep_linear(seed=2)
    params = list(model.parameters())
    joint = cc.KFAC(model, nn.MSELoss(), params, data)
    separated = cc.KFAC(model, nn.MSELoss(), params, data, separate_weight_and_bias=True)
    assert separated.permutation is not joint.permutation
    check_exact(joint, model, params, data, layer_groups(model))
    check_exact(separated, model, params, data, [[p] for p in params])


def test_a_new_module_is_found():
    model, data = deep_linear(widths=(3, 4, 4), seed=3)
    cc.KFAC(model, nn.MSELoss(), list(model.parameters()), [(X, y[:, :4]) for X, y in data])
    model.append(nn.Linear(4, 2).to(F64))
    params = list(model.parameters())
    kfac = cc.KFAC(model, nn.MSELoss(), params, [(X, y[:, :2]) for X, y in data])
    assert len(kfac.layers) == 3
    check_exact(kfac, model, params, [(X, y[:, :2]) for X, y in data], layer_groups(model))


def test_a_swapped_parameter_is_found():
    model, data = deep_linear(widths=(3, 4, 4, 2), seed=4)
    cc.KFAC(model, nn.MSELoss(), list(model.parameters()), data)
    model[2].weight = nn.Parameter(torch.randn(2, 4, dtype=F64))
    params = list(model.parameters())
    kfac = cc.KFAC(model, nn.MSELoss(), params, data)
    check_exact(kfac, model, params, data, layer_groups(model))


def test_a_tied_weight_is_found():
    model, data = deep_linear(widths=(3, 4, 4, 4, 2), seed=5)
    first = cc.KFAC(model, nn.MSELoss(), list(model.parameters()), data)
    assert not any(isinstance(layer, SharedWeightLayer) for layer in first.layers)
    model[2].weight, model[2].bias = model[1].weight, model[1].bias
    params = list(model.parameters())
    kfac = cc.KFAC(model, nn.MSELoss(), params, data)
    assert any(isinstance(layer, SharedWeightLayer) for layer in kfac.layers)


class Switchable(nn.Module):
    """A linear layer called through ``F.linear`` or, with ``functional=False``, as ``x @ Wᵀ``."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.functional = True

    def forward(self, x):
        if self.functional:
            return F.linear(x, self.inner.weight, self.inner.bias)
        return x @ self.inner.weight.T + self.inner.bias


def test_a_changed_module_attribute_is_found():
    model = Switchable().to(F64)
    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    params = list(model.parameters())
    cc.KFAC(model, nn.MSELoss(), params, [(X, y)])
    model.functional = False
    with pytest.raises(ValueError, match="No supported layer"):
        cc.KFAC(model, nn.MSELoss(), params, [(X, y)])
    model.functional = True
    kfac = cc.KFAC(model, nn.MSELoss(), params, [(X, y)])
    expected = dense_ggn(model, nn.MSELoss(), params, [(X, y)])
    assert relative_error(kfac.to_dense(), expected) < EXACT_RTOL


USE_FIRST_BIAS = [True]


class TwoBiases(nn.Module):
    """A linear call whose bias a global switch (outside the model) picks."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.first = nn.Parameter(torch.randn(2))
        self.second = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return F.linear(x, self.weight, self.first if USE_FIRST_BIAS[0] else self.second)


class FlippingBatches:
    """Two batches; reading the second flips the global switch (reset on every new pass)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        USE_FIRST_BIAS[0] = True
        yield self.batches[0]
        USE_FIRST_BIAS[0] = False
        yield self.batches[1]


def test_calls_that_differ_from_the_first_batch_raise():
    model = TwoBiases().to(F64)
    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    data = FlippingBatches([(X[:3], y[:3]), (X[3:], y[3:])])
    try:
        with pytest.raises(ValueError, match="when the layers were found"):
            cc.KFAC(model, nn.MSELoss(), [model.weight, model.first], data)
    finally:
        USE_FIRST_BIAS[0] = True


class Marked(nn.Module):
    """A module type that gets its own backend method after its first dispatch."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(1, 1)

    def forward(self, x):
        return self.inner(x)


def test_backend_dispatch_follows_new_registrations():
    model, loss = Marked(), nn.MSELoss()
    params = list(model.parameters())
    assert isinstance(memoised_backend(model, loss, params), TorchBackend)
    sentinel = object()

    @dispatch
    def curvature_backend(model: Marked, loss_func: object, params: object) -> object:  # noqa: F811
        return sentinel

    assert memoised_backend(model, loss, params) is sentinel
    assert isinstance(memoised_backend(model.inner, loss, params), TorchBackend)


@pytest.mark.usefixtures("jax_float64")
def test_a_build_inside_jit_leaves_no_tracer_for_later_builds():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tests import jax_reference

    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        "w1": jax.random.normal(keys[0], (4, 3), dtype=jnp.float64),
        "b1": jax.random.normal(keys[1], (4,), dtype=jnp.float64),
        "w2": jax.random.normal(keys[2], (2, 4), dtype=jnp.float64),
    }
    X = jax.random.normal(keys[3], (6, 3), dtype=jnp.float64)
    y = jax.random.normal(keys[4], (6, 2), dtype=jnp.float64)
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    v = jax.random.normal(keys[5], (24,), dtype=jnp.float64)

    def model_fn(p, x):
        return (x @ p["w1"].T + p["b1"]) @ p["w2"].T

    loss = cc.losses.MSE()

    def product(p):
        return cc.KFAC(model_fn, loss, p, data, check_deterministic=False) @ v

    traced = jax.jit(product)(params)
    kfac = cc.KFAC(model_fn, loss, params, data, check_deterministic=False)
    dense = np.asarray(kfac @ jnp.eye(kfac.shape[0]))
    flat = np.concatenate([np.full(4, 0), np.full(12, 0), np.full(8, 1)])  # b1, w1, w2
    mask = (flat[:, None] == flat[None, :]).astype(np.float64)
    expected = np.asarray(jax_reference.dense_ggn(model_fn, "mse", "mean", params, data)) * mask
    assert np.linalg.norm(dense - expected) / np.linalg.norm(expected) < EXACT_RTOL
    assert np.allclose(np.asarray(traced), dense @ np.asarray(v), rtol=EXACT_RTOL)
