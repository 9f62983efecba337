"""Loss descriptors against torch's losses and autodiff on the output."""

import pytest
import torch
from torch import nn
from torch.func import grad, hessian

from cola_curvature import losses
from cola_curvature.backends.torch.losses import as_loss
from cola_curvature.backends.torch.state import TorchExampleRandom

F64 = torch.float64


def output_and_targets(name, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, dtype=F64, generator=generator)
    if name == "ce":
        labels_shape = (shape[0],) + shape[2:]
        return f, torch.randint(0, shape[1], labels_shape, generator=generator)
    if name == "bce":
        return f, torch.rand(shape, dtype=F64, generator=generator)
    return f, torch.randn(shape, dtype=F64, generator=generator)


TORCH_LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
SHAPES = {
    "mse": [(4, 3), (4, 2, 3)],
    "ce": [(4, 3), (4, 3, 2), (4, 3, 2, 2)],
    "bce": [(4, 3), (4, 5, 2)],
}
CASES = [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize(("name", "shape"), CASES, ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_value_gradient_hessian_and_scale_match_torch(name, shape, reduction):
    f, y = output_and_targets(name, shape)
    torch_loss = TORCH_LOSSES[name](reduction=reduction)
    loss = as_loss(torch_loss)
    summed = TORCH_LOSSES[name](reduction="sum")
    assert torch.allclose(loss.sum_value(f, y), summed(f, y), rtol=1e-12)
    assert torch.allclose(
        loss.scale(f, f.shape[0]) * loss.sum_value(f, y), torch_loss(f, y), rtol=1e-12
    )
    assert torch.allclose(loss.output_gradient(f, y), grad(lambda o: summed(o, y))(f), rtol=1e-12)
    full_hessian = hessian(lambda o: summed(o.reshape(shape), y))(f.flatten())
    u = torch.randn((2, *shape), dtype=F64)
    expected = (full_hessian @ u.reshape(2, -1).T).T.reshape(u.shape)
    assert torch.allclose(loss.hessian_matmat(f, u), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "shape"), CASES, ids=str)
def test_hessian_factor_is_exact_per_example(name, shape):
    f, y = output_and_targets(name, shape, seed=1)
    loss = as_loss(TORCH_LOSSES[name](reduction="sum"))
    factor = loss.hessian_sqrt(f)
    summed = TORCH_LOSSES[name](reduction="sum")
    for n in range(shape[0]):
        per_example = hessian(lambda o, n=n: summed(o.reshape((1, *shape[1:])), y[n : n + 1]))(
            f[n].flatten()
        )
        columns = factor[:, n].reshape(factor.shape[0], -1)
        assert torch.allclose(columns.T @ columns, per_example, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "shape"), [("mse", (3, 2)), ("ce", (3, 4)), ("bce", (3, 2))])
def test_sampled_gradients_have_the_hessian_as_second_moment(name, shape):
    f, _ = output_and_targets(name, shape, seed=2)
    loss = as_loss(TORCH_LOSSES[name](reduction="sum"))
    samples = 20_000
    d = loss.sampled_output_gradients(f, TorchExampleRandom(0, 0), samples)
    moment = torch.einsum("sni,snj->nij", d, d) / samples
    eye = torch.eye(shape[1], dtype=F64)
    expected = torch.stack(
        [loss.hessian_matmat(f[n : n + 1], eye[:, None])[:, 0] for n in range(shape[0])]
    )
    assert torch.allclose(moment, expected, atol=0.05 * expected.abs().max())


def test_sampling_uses_a_private_generator():
    f, _ = output_and_targets("ce", (5, 3))
    state = torch.random.get_rng_state()
    first = losses.CrossEntropy().sample(f, TorchExampleRandom(3, 0), 2)
    second = losses.CrossEntropy().sample(f, TorchExampleRandom(3, 0), 2)
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_torch_losses_are_translated_and_options_are_checked():
    assert isinstance(as_loss(nn.MSELoss(reduction="sum")), losses.MSE)
    assert as_loss(nn.CrossEntropyLoss()).reduction is losses.Reduction.MEAN
    descriptor = losses.BCEWithLogits("sum")
    assert as_loss(descriptor) is descriptor
    with pytest.raises(TypeError, match="Unsupported loss L1Loss.*MSELoss"):
        as_loss(nn.L1Loss())
    with pytest.raises(ValueError, match="reduction 'none'.*'sum', 'mean'"):
        as_loss(nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="weight"):
        as_loss(nn.CrossEntropyLoss(weight=torch.ones(3)))


@pytest.mark.parametrize(
    ("loss", "f", "y", "message"),
    [
        (losses.MSE(), torch.zeros(4, 2), torch.zeros(4), "same shape"),
        (losses.CrossEntropy(), torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), "labels"),
        (losses.CrossEntropy(), torch.zeros(4, 3), torch.zeros(4), "integer"),
        (
            losses.BCEWithLogits(),
            torch.zeros(4, 2),
            torch.zeros(4, 2, dtype=torch.long),
            "floating",
        ),
    ],
)
def test_targets_of_the_wrong_shape_or_dtype_are_rejected(loss, f, y, message):
    with pytest.raises(ValueError, match=message):
        loss.check_target(f, y)
