"""The dense references checked against independent routes, so that they can fail too.

Nothing here imports ``cola_curvature``: these tests pin down the ground truth on their own.
Independent routes: ``torch.autograd`` on the real module (double backward and per-example
``backward``), central finite differences, forward-mode Jacobians with closed-form output
Hessians, torch's own ratio of "mean" to "sum", and closed forms for a linear model.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacfwd

from tests._tols import (
    EXACT_ATOL,
    EXACT_RTOL,
    FINITE_DIFFERENCE_RTOL,
    FINITE_DIFFERENCE_STEP,
    PSD_RTOL,
)
from tests.cases import CASES, LOSSES, Case, ignore_some_labels
from tests.reference import (
    concatenated,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    empirical_fisher_matmat,
    flat_params_and_unflatten,
    ggn_matmat,
    hessian_matmat,
    reduction_scale,
)

F64 = torch.float64
#: One case per model and loss (mean reduction, uneven or dict batches) for the routes
#: that are slower than the reference itself; the scaling test still runs on every case.
ROUTE_CASES = [
    case for case in CASES if case.reduction == "mean" and case.batching in ("uneven", "dict")
]
ROUTE_IDS = [case.id for case in ROUTE_CASES]
#: Finite differences need a smooth model (no ReLU / max-pool kinks within a step).
SMOOTH_CASES = [case for case in ROUTE_CASES if case.model != "cnn" and case.loss != "bce"]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def autograd_loss(model, loss_func, data):
    """The total loss through the real module (no ``torch.func``)."""
    X, Y = concatenated(data)
    return loss_func(model(X), Y)


def autograd_gradient(model, loss_func, params, data, create_graph=False):
    loss = autograd_loss(model, loss_func, data)
    return flat(torch.autograd.grad(loss, params, create_graph=create_graph))


def autograd_hessian(model, loss_func, params, data):
    """``∇²L`` row by row with double backward on the module's own parameters."""
    gradient = autograd_gradient(model, loss_func, params, data, create_graph=True)
    rows = [
        flat(torch.autograd.grad(g, params, retain_graph=True, materialize_grads=True))
        for g in gradient
    ]
    return torch.stack(rows).detach()


def finite_difference_hessian(model, loss_func, params, data, h=FINITE_DIFFERENCE_STEP):
    """Central differences of the autograd gradient, one parameter entry at a time."""
    columns = []
    with torch.no_grad():
        for p in params:
            for index in range(p.numel()):
                entry = p.view(-1)[index : index + 1]
                original = entry.clone()
                entry.add_(h)
                with torch.enable_grad():
                    plus = autograd_gradient(model, loss_func, params, data)
                entry.copy_(original - h)
                with torch.enable_grad():
                    minus = autograd_gradient(model, loss_func, params, data)
                entry.copy_(original)
                columns.append((plus - minus) / (2 * h))
    return torch.stack(columns, dim=1)


def closed_form_ggn(model, loss_func, params, data):
    """``R Σ Jᵀ Λ J`` with a forward-mode Jacobian and the textbook output Hessian ``Λ``.

    MSE: ``Λ = 2 I``; BCE: ``Λ = diag(σ(1-σ))``; CE: per position ``diag(p) - p pᵀ`` with
    ``p = softmax`` over the class axis 1.
    """
    X, _ = concatenated(data)
    names = {id(p): n for n, p in model.named_parameters()}
    theta0, unflatten = flat_params_and_unflatten(params)

    def outputs_at(theta):
        replaced = dict(zip([names[id(p)] for p in params], unflatten(theta), strict=True))
        return functional_call(model, replaced, (X,))

    outputs = outputs_at(theta0).detach()
    jacobian = jacfwd(outputs_at)(theta0)  # (*outputs.shape, D)
    scale = reduction_scale(loss_func, outputs)
    D = theta0.numel()
    if isinstance(loss_func, nn.MSELoss):
        J = jacobian.reshape(-1, D)
        return 2 * scale * J.T @ J
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        J = jacobian.reshape(-1, D)
        s = torch.sigmoid(outputs).reshape(-1)
        return scale * J.T @ ((s * (1 - s))[:, None] * J)
    C = outputs.shape[1]
    J = jacobian.movedim(1, -2).reshape(-1, C, D)  # (positions, C, D)
    p = torch.softmax(outputs, dim=1).movedim(1, -1).reshape(-1, C)
    Lambda = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return scale * torch.einsum("pcd,pce,pef->df", J, Lambda, J)


def autograd_empirical_fisher(model, loss_func, params, data):
    """Per-example gradients by ``backward`` on the module; ``R`` from torch's own ratio."""
    X, Y = concatenated(data)
    summed = type(loss_func)(reduction="sum")
    gradients = []
    for n in range(Y.shape[0]):
        x = {k: v[n : n + 1] for k, v in X.items()} if isinstance(X, dict) else X[n : n + 1]
        gradients.append(
            flat(torch.autograd.grad(summed(model(x), Y[n : n + 1]), params, allow_unused=False))
        )
    G = torch.stack(gradients)
    with torch.no_grad():
        outputs = model(X)
        ratio = loss_func(outputs, Y) / summed(outputs, Y)
    return ratio * G.T @ G


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_reduction_scale_matches_torchs_ratio_of_mean_to_sum(case):
    model, loss_func, params, data = case.build()
    X, Y = concatenated(data)
    with torch.no_grad():
        outputs = model(X)
    summed = type(loss_func)(reduction="sum")(outputs, Y)
    expected = (loss_func(outputs, Y) / summed).item()
    assert reduction_scale(loss_func, outputs) == pytest.approx(expected, rel=EXACT_RTOL)
    assert reduction_scale(loss_func, outputs, Y) == pytest.approx(expected, rel=EXACT_RTOL)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_references_follow_torchs_ignore_index(reduction):
    """Labels equal to ``ignore_index`` leave the sum and the "mean" count, as in torch."""
    model, loss_func, params, data = Case("sequence", "ce", reduction, "uneven").build()
    data = ignore_some_labels(data)
    X, Y = concatenated(data)
    with torch.no_grad():
        outputs = model(X)
    summed = type(loss_func)(reduction="sum")(outputs, Y)
    expected_scale = (loss_func(outputs, Y) / summed).item()
    assert reduction_scale(loss_func, outputs, Y) == pytest.approx(expected_scale, rel=EXACT_RTOL)
    assert (
        relative_error(
            dense_empirical_fisher(model, loss_func, params, data),
            autograd_empirical_fisher(model, loss_func, params, data),
        )
        < EXACT_RTOL
    )
    assert (
        relative_error(
            dense_hessian(model, loss_func, params, data),
            autograd_hessian(model, loss_func, params, data),
        )
        < EXACT_RTOL
    )


@pytest.mark.parametrize("case", ROUTE_CASES, ids=ROUTE_IDS)
def test_references_are_symmetric_and_psd_where_promised(case):
    model, loss_func, params, data = case.build()
    D = sum(p.numel() for p in params)
    assert D <= 150
    for name, reference in [
        ("hessian", dense_hessian),
        ("ggn", dense_ggn),
        ("ef", dense_empirical_fisher),
    ]:
        matrix = reference(model, loss_func, params, data)
        assert matrix.shape == (D, D), name
        assert matrix.dtype == F64, name
        assert torch.allclose(matrix, matrix.T, rtol=EXACT_RTOL, atol=EXACT_ATOL), name
        if name != "hessian":
            eigenvalues = torch.linalg.eigvalsh(matrix)
            assert eigenvalues.min() >= -PSD_RTOL * eigenvalues.abs().max(), name


@pytest.mark.parametrize("case", ROUTE_CASES, ids=ROUTE_IDS)
def test_hessian_reference_matches_double_backward(case):
    model, loss_func, params, data = case.build()
    expected = autograd_hessian(model, loss_func, params, data)
    assert relative_error(dense_hessian(model, loss_func, params, data), expected) < EXACT_RTOL


@pytest.mark.parametrize("case", SMOOTH_CASES, ids=[case.id for case in SMOOTH_CASES])
def test_hessian_reference_matches_finite_differences(case):
    model, loss_func, params, data = case.build()
    expected = finite_difference_hessian(model, loss_func, params, data)
    assert (
        relative_error(dense_hessian(model, loss_func, params, data), expected)
        < FINITE_DIFFERENCE_RTOL
    )


@pytest.mark.parametrize("case", ROUTE_CASES, ids=ROUTE_IDS)
def test_ggn_reference_matches_forward_mode_closed_form(case):
    model, loss_func, params, data = case.build()
    expected = closed_form_ggn(model, loss_func, params, data)
    assert relative_error(dense_ggn(model, loss_func, params, data), expected) < EXACT_RTOL


@pytest.mark.parametrize("case", ROUTE_CASES, ids=ROUTE_IDS)
def test_empirical_fisher_reference_matches_per_example_backward(case):
    model, loss_func, params, data = case.build()
    expected = autograd_empirical_fisher(model, loss_func, params, data)
    actual = dense_empirical_fisher(model, loss_func, params, data)
    assert relative_error(actual, expected) < EXACT_RTOL


@pytest.mark.parametrize("case", ROUTE_CASES, ids=ROUTE_IDS)
def test_matrix_free_references_match_the_dense_ones(case):
    problem = case.build()
    D = sum(p.numel() for p in problem[2])
    V = torch.randn(D, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for matmat, dense in [
        (hessian_matmat, dense_hessian),
        (ggn_matmat, dense_ggn),
        (empirical_fisher_matmat, dense_empirical_fisher),
    ]:
        assert relative_error(matmat(*problem, V), dense(*problem) @ V) < EXACT_RTOL, matmat


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", LOSSES)
def test_hessian_equals_ggn_for_the_last_layer(loss, reduction):
    """The output is linear in the last layer's weights, so ``∇²L = Jᵀ H J`` there."""
    model, loss_func, _, data = Case("sequence", loss, reduction, "uneven").build()
    params = [model.head.weight, model.head.bias]
    hessian, ggn = (f(model, loss_func, params, data) for f in (dense_hessian, dense_ggn))
    assert relative_error(hessian, ggn) < EXACT_RTOL
    full = Case("sequence", loss, reduction, "uneven").build()
    assert relative_error(dense_hessian(*full), dense_ggn(*full)) > 1e-6  # not trivially so


def test_references_on_a_linear_model_match_closed_forms():
    """``L = Σ‖W x_n − y_n‖²``: ``∇²L = GGN = I ⊗ 2XᵀX``, ``∇ℓ_n = 2 (W x_n − y_n) ⊗ x_n``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).to(F64)
    X, Y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    for reduction, scale in [("sum", 1.0), ("mean", 1.0 / 12)]:
        data, loss_func = [(X[:4], Y[:4]), (X[4:], Y[4:])], nn.MSELoss(reduction=reduction)
        params = list(model.parameters())
        closed_form = scale * torch.kron(torch.eye(2, dtype=F64), 2 * X.T @ X)
        assert relative_error(dense_ggn(model, loss_func, params, data), closed_form) < EXACT_RTOL
        assert (
            relative_error(dense_hessian(model, loss_func, params, data), closed_form) < EXACT_RTOL
        )
        residual = X @ model.weight.detach().T - Y
        gradients = torch.stack([torch.kron(2 * residual[n], X[n]) for n in range(6)])
        expected_ef = scale * gradients.T @ gradients
        actual_ef = dense_empirical_fisher(model, loss_func, params, data)
        assert relative_error(actual_ef, expected_ef) < EXACT_RTOL


def test_reference_does_not_depend_on_the_batching():
    for loss in LOSSES:
        one = Case("sequence", loss, "mean", "one").build()
        uneven = Case("sequence", loss, "mean", "uneven").build()
        for reference in (dense_hessian, dense_ggn, dense_empirical_fisher):
            assert relative_error(reference(*uneven), reference(*one)) < EXACT_RTOL


def test_flat_params_and_unflatten_round_trip():
    params = [torch.randn(2, 3, dtype=F64), torch.randn(4, dtype=F64)]
    theta, unflatten = flat_params_and_unflatten(params)
    assert torch.equal(theta, torch.cat([params[0].flatten(), params[1]]))
    assert all(torch.equal(a, b) for a, b in zip(unflatten(theta), params, strict=True))
    matrix = torch.stack([theta, 2 * theta], dim=1)
    assert [t.shape for t in unflatten(matrix)] == [(2, 3, 2), (4, 2)]
    assert torch.equal(unflatten(matrix)[0][..., 1], 2 * params[0])


def test_reference_refuses_losses_it_cannot_scale():
    model, _, params, data = Case("mlp", "ce", "mean", "one").build()
    for loss_func in [
        nn.L1Loss(),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(3, dtype=F64)),
        nn.CrossEntropyLoss(reduction="none"),
    ]:
        with pytest.raises(NotImplementedError):
            dense_ggn(model, loss_func, params, data)
