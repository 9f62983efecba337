"""KFAC and EKFAC against dense curvature blocks in the settings where they are exact."""

import itertools

import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests._tols import EXACT_RTOL
from tests.kfac_reference import reference_kfac_factors
from tests.reference import dense_empirical_fisher, dense_ggn

F64 = torch.float64


class MeanOver(nn.Module):
    """Average over the given dimensions (a parameter-free 'reduce' of shared positions)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(self.dims)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def layer_block_mask(model, params):
    """1 where both coordinates belong to the same layer's parameters, else 0."""
    owner = {}
    for module_index, module in enumerate(model.modules()):
        for p in module.parameters(recurse=False):
            owner[id(p)] = module_index
    labels = torch.cat([torch.full((p.numel(),), owner[id(p)]) for p in params])
    return (labels[:, None] == labels[None, :]).to(F64)


def uneven_batches(X, y):
    return [(X[:3], y[:3]), (X[3:5], y[3:5]), (X[5:], y[5:])]


def deep_linear_mse(reduction):
    """Deep linear network + MSE: the output factor is the same for every example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), list(model.parameters()), uneven_batches(X, y)


def sequence_linear_mse(reduction):
    """Position-wise deep linear network over a sequence + MSE per position: expand exact."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(8, 5, 3, dtype=F64), torch.randn(8, 5, 2, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), list(model.parameters()), uneven_batches(X, y)


def sequence_mean_linear_mse(reduction):
    """Shared linear layer, mean over the sequence, linear head + MSE: reduce exact."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), MeanOver(1), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(8, 5, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), list(model.parameters()), uneven_batches(X, y)


def pointwise_conv_mse(reduction):
    """1×1 convolutions (position-wise) + MSE per pixel: expand exact over pixels."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)).to(F64)
    X, y = torch.randn(8, 2, 3, 3, dtype=F64), torch.randn(8, 2, 3, 3, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), list(model.parameters()), uneven_batches(X, y)


def conv_pool_linear_mse(reduction):
    """3×3 conv (padding, stride 2), global average pool, linear head + MSE: reduce exact."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2, dilation=1)
    model = nn.Sequential(conv, MeanOver((2, 3)), nn.Linear(3, 2)).to(F64)
    X, y = torch.randn(8, 2, 5, 5, dtype=F64), torch.randn(8, 2, dtype=F64)
    return model, nn.MSELoss(reduction=reduction), list(model.parameters()), uneven_batches(X, y)


EXACT_SETTINGS = {
    "deep-linear-expand": (deep_linear_mse, "expand"),
    "deep-linear-reduce": (deep_linear_mse, "reduce"),
    "sequence-expand": (sequence_linear_mse, "expand"),
    "sequence-mean-reduce": (sequence_mean_linear_mse, "reduce"),
    "pointwise-conv-expand": (pointwise_conv_mse, "expand"),
    "conv-pool-reduce": (conv_pool_linear_mse, "reduce"),
}


@pytest.mark.parametrize(
    ("setting", "reduction"),
    list(itertools.product(EXACT_SETTINGS, ["sum", "mean"])),
    ids=lambda value: str(value),
)
def test_type2_kfac_equals_ggn_blocks_where_exact(setting, reduction):
    build, approx = EXACT_SETTINGS[setting]
    model, loss_func, params, data = build(reduction)
    expected = dense_ggn(model, loss_func, params, data) * layer_block_mask(model, params)
    kfac = cc.KFAC(model, loss_func, params, data, fisher_type="type-2", kfac_approx=approx)
    assert relative_error(kfac.to_dense(), expected) < EXACT_RTOL
    ekfac = cc.EKFAC(model, loss_func, params, data, fisher_type="type-2", kfac_approx=approx)
    assert relative_error(ekfac.to_dense(), expected) < EXACT_RTOL


def single_example(loss_name):
    """A tanh MLP on one example, with params passed out of order and non-adjacent."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    X = torch.randn(1, 3, dtype=F64)
    losses = {
        "ce": (nn.CrossEntropyLoss(), torch.randint(0, 3, (1,))),
        "mse": (nn.MSELoss(), torch.randn(1, 3, dtype=F64)),
        "bce": (nn.BCEWithLogitsLoss(), torch.rand(1, 3, dtype=F64)),
    }
    loss_func, y = losses[loss_name]
    params = [model[2].weight, model[0].bias, model[0].weight, model[2].bias]
    return model, loss_func, params, [(X, y)]


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_single_example_kfac_is_exact_for_every_fisher_type(loss_name):
    """One example: G ⊗ A is the curvature block for type-2, empirical and (same seed) mc."""
    model, loss_func, params, data = single_example(loss_name)
    mask = layer_block_mask(model, params)
    references = {
        "type-2": dense_ggn(model, loss_func, params, data),
        "empirical": dense_empirical_fisher(model, loss_func, params, data),
        "mc": cc.FisherMC(model, loss_func, params, data, mc_samples=3, seed=7).to_dense(),
    }
    for fisher_type, reference in references.items():
        kfac = cc.KFAC(
            model, loss_func, params, data, fisher_type=fisher_type, mc_samples=3, seed=7
        )
        assert relative_error(kfac.to_dense(), reference * mask) < EXACT_RTOL, fisher_type


def test_ekfac_eigenvalues_are_the_diagonal_of_the_exact_block_in_the_kfac_eigenbasis():
    """EKFAC's defining property, on a non-linear model where KFAC itself is not exact."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    X, y = torch.randn(9, 3, dtype=F64), torch.randint(0, 3, (9,))
    loss_func, params, data = nn.CrossEntropyLoss(), list(model.parameters()), uneven_batches(X, y)
    for fisher_type, reference in [
        ("type-2", dense_ggn(model, loss_func, params, data)),
        ("empirical", dense_empirical_fisher(model, loss_func, params, data)),
    ]:
        kfac = cc.KFAC(model, loss_func, params, data, fisher_type=fisher_type)
        ekfac = cc.EKFAC(model, loss_func, params, data, fisher_type=fisher_type)
        start = 0
        for block in ekfac.blocks:
            stop = start + block.shape[0]
            positions = ekfac.permutation[start:stop]
            exact_block = reference[positions][:, positions]
            basis = torch.kron(block.q_out, block.q_in)
            projected = torch.diag(basis.T @ exact_block @ basis)
            assert relative_error(block.eigenvalues.reshape(-1), projected) < EXACT_RTOL
            start = stop
        mask = layer_block_mask(model, params)
        ekfac_error = relative_error(ekfac.to_dense(), reference * mask)
        kfac_error = relative_error(kfac.to_dense(), reference * mask)
        assert ekfac_error <= kfac_error
        assert kfac_error > 1e-3


def test_forward_only_has_identity_output_factor_and_mean_input_factor():
    model, loss_func, params, data = deep_linear_mse("mean")
    kfac = cc.KFAC(model, loss_func, params, data, fisher_type="forward-only")
    X = torch.cat([x for x, _ in data])
    first = kfac.blocks[0]
    augmented = torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], dim=1)
    assert torch.allclose(first.output_factor, torch.eye(4, dtype=F64))
    assert torch.allclose(first.input_factor, augmented.T @ augmented / X.shape[0], rtol=1e-12)


def test_batching_does_not_change_kfac():
    model, loss_func, params, data = sequence_linear_mse("mean")
    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    for approx in ["expand", "reduce"]:
        one = cc.KFAC(model, loss_func, params, [(X, y)], kfac_approx=approx).to_dense()
        split = cc.KFAC(model, loss_func, params, data, kfac_approx=approx).to_dense()
        assert relative_error(split, one) < EXACT_RTOL


class ScaledLinear(nn.Module):
    """A linear layer followed by a free elementwise scale that no KFAC layer owns."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_uncovered_parameters_raise_or_get_an_exact_dense_block():
    torch.manual_seed(7)
    model = ScaledLinear().to(F64)
    X, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    loss_func, data = nn.CrossEntropyLoss(), [(X, y)]
    params = [model.scale, model.linear.weight]
    with pytest.raises(ValueError, match=r"params\[0\].*uncovered='dense'"):
        cc.KFAC(model, loss_func, params, data)
    ggn = dense_ggn(model, loss_func, params, data)
    for operator in (cc.KFAC, cc.EKFAC):
        dense = operator(model, loss_func, params, data, uncovered="dense").to_dense()
        assert relative_error(dense[:2, :2], ggn[:2, :2]) < EXACT_RTOL
        assert torch.count_nonzero(dense[:2, 2:]) == 0


def test_kfac_options_are_validated():
    model, loss_func, params, data = deep_linear_mse("sum")
    with pytest.raises(ValueError, match="fisher_type.*'type-2'"):
        cc.KFAC(model, loss_func, params, data, fisher_type="type-3")
    with pytest.raises(ValueError, match="kfac_approx.*'expand'"):
        cc.KFAC(model, loss_func, params, data, kfac_approx="average")
    with pytest.raises(ValueError, match="forward-only"):
        cc.EKFAC(model, loss_func, params, data, fisher_type="forward-only")
    with pytest.raises(ValueError, match="groups=1"):
        grouped = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2)).to(F64)
        X = torch.randn(2, 2, 3, 3, dtype=F64)
        cc.KFAC(grouped, loss_func, list(grouped.parameters()), [(X, X)])


class SequenceClassifier(nn.Module):
    """The same Linear over a sequence, tanh, a Linear head; CE outputs (N, C, T)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(x))).permute(0, 2, 1)


def reference_models():
    """(name, model, data, layers) for an MLP, two CNNs and a weight-sharing model, CE loss.

    The second CNN's convolution has a non-square kernel, strides, dilation and padding.
    """
    torch.manual_seed(9)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    cnn = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
    ).to(F64)
    strided = nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(60, 3),
    ).to(F64)
    seq = SequenceClassifier().to(F64)
    X_mlp, X_cnn, X_strided, X_seq = (
        torch.randn(6, 3, dtype=F64),
        torch.randn(6, 2, 4, 4, dtype=F64),
        torch.randn(6, 2, 5, 5, dtype=F64),
        torch.randn(6, 4, 3, dtype=F64),
    )
    y, y_seq = torch.randint(0, 3, (6,)), torch.randint(0, 3, (6, 4))
    return {
        "mlp": (mlp, uneven_batches(X_mlp, y), [mlp[0], mlp[2]]),
        "cnn": (cnn, uneven_batches(X_cnn, y), [cnn[0], cnn[4]]),
        "strided-cnn": (strided, uneven_batches(X_strided, y), [strided[0], strided[3]]),
        "sequence": (seq, uneven_batches(X_seq, y_seq), [seq.shared, seq.head]),
    }


def sampled_targets(model, loss, data, mc_samples, seed):
    """Targets drawn as KFAC draws them: example ``n``'s from the stream of ``(seed, n)``."""
    from cola_curvature.backends.torch.state import TorchExampleRandom

    per_example, first_example = [], 0
    for x, _ in data:
        with torch.no_grad():
            outputs = model(x)
        draws = loss.sample(outputs, TorchExampleRandom(seed, first_example), mc_samples)
        per_example += [[d[n : n + 1] for d in draws] for n in range(x.shape[0])]
        first_example += x.shape[0]
    return per_example


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "strided-cnn", "sequence"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kfac_factors_match_their_definition(model_name, fisher_type, approx, reduction):
    model, data, layers = reference_models()[model_name]
    loss_func = nn.CrossEntropyLoss(reduction=reduction)
    samples = sampled_targets(model, cc.losses.CrossEntropy(reduction), data, 2, seed=3)
    kfac = cc.KFAC(
        model,
        loss_func,
        list(model.parameters()),
        data,
        fisher_type=fisher_type,
        kfac_approx=approx,
        mc_samples=2,
        seed=3,
    )
    for layer, block in zip(layers, kfac.blocks, strict=True):
        G, A = reference_kfac_factors(model, loss_func, layer, data, fisher_type, approx, samples)
        assert relative_error(block.input_factor, A) < EXACT_RTOL
        assert relative_error(block.output_factor, G) < EXACT_RTOL


def test_layer_norm_weights_are_named_in_the_error():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"'1\.weight'.*'1\.bias'"):
        cc.KFAC(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
