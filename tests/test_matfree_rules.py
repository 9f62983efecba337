"""``cola.linalg`` on the matrix-free curvature operators against dense float64 references."""

import warnings

import cola
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests import reference

F64 = torch.float64
SOLVE_RTOL = 1e-8
EIG_ATOL = 1e-8


def mlp_problem(num_examples=40, loss="mse", seed=0):
    """A tanh MLP 3-6-3 (D = 45) with uneven batches; the MSE GGN is nonsingular for N = 40.

    (The CE GGN is singular whatever N: adding a constant to all logits changes no loss.)
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    X = torch.randn(num_examples, 3, dtype=F64)
    if loss == "ce":
        loss_func, y = nn.CrossEntropyLoss(), torch.randint(0, 3, (num_examples,))
    else:
        loss_func, y = nn.MSELoss(reduction="sum"), torch.randn(num_examples, 3, dtype=F64)
    split = num_examples // 2 + 1
    data = [(X[:split], y[:split]), (X[split:], y[split:])]
    return model, loss_func, list(model.parameters()), data


@pytest.fixture(scope="module")
def problem():
    return mlp_problem()


@pytest.fixture(scope="module")
def dense(problem):
    return {
        "ggn": reference.dense_ggn(*problem).detach(),
        "hessian": reference.dense_hessian(*problem).detach(),
    }


def build(name, problem):
    return {"ggn": cc.GGN, "hessian": cc.Hessian}[name](*problem)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def shifted_dense(matrix, shift):
    return matrix + shift * torch.eye(matrix.shape[0], dtype=F64)


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_damping_gives_one_shifted_operator_whichever_way_it_is_written(problem, dense, name):
    operator = build(name, problem)
    eye = cola.ops.I_like(operator)
    expected = shifted_dense(dense[name], 0.3)
    for damped in [
        operator + 0.3 * eye,
        0.3 * eye + operator,
        eye * 0.3 + operator,
        (operator + 0.1 * eye) + 0.2 * eye,
        0.2 * eye + (operator + 0.1 * eye),
    ]:
        assert isinstance(damped, cc.ShiftedCurvature)
        assert relative_error(damped @ torch.eye(operator.shape[0], dtype=F64), expected) < 1e-12
    assert (operator + 0.3 * eye).isa(cola.PSD) == (name == "ggn")
    assert not (operator + (-0.3) * eye).isa(cola.PSD)


@pytest.mark.parametrize(
    ("name", "shift", "solver"),
    [("ggn", 0.05, cc.CG), ("hessian", 0.05, cc.MINRES), ("hessian", 0.0, cc.MINRES)],
)
def test_default_inverse_picks_the_solver_and_matches_a_dense_solve(
    problem, dense, name, shift, solver
):
    operator = build(name, problem)
    if name == "hessian":
        assert torch.linalg.eigvalsh(shifted_dense(dense[name], shift))[0] < 0  # indefinite
    damped = operator + shift * cola.ops.I_like(operator) if shift else operator
    inverse = cola.linalg.inv(damped)
    assert isinstance(inverse.alg, solver)
    B = torch.randn(operator.shape[0], 3, dtype=F64)
    expected = torch.linalg.solve(shifted_dense(dense[name], shift), B)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cc.ConvergenceWarning)
        assert relative_error(inverse @ B, expected) < SOLVE_RTOL
        assert relative_error(inverse @ B[:, 0], expected[:, 0]) < SOLVE_RTOL
    assert inverse.info["iterations"] <= 3 * operator.shape[0]  # no reorthogonalisation
    assert float(inverse.info["relative_residual"].max()) <= inverse.alg.tol


@pytest.mark.parametrize(
    "alg",
    [cc.CG(), cc.MINRES(), cc.Neumann(max_iters=2000), cola.linalg.CG(tol=1e-11, max_iters=500)],
    ids=["cg", "minres", "neumann", "cola-cg"],
)
def test_every_solver_solves_the_damped_ggn(problem, dense, alg):
    # λ = 5 keeps the condition number near 50, so the Neumann series converges in time
    operator = build("ggn", problem)
    inverse = cola.linalg.inv(operator + 5.0 * cola.ops.I_like(operator), alg=alg)
    B = torch.randn(operator.shape[0], 2, dtype=F64)
    expected = torch.linalg.solve(shifted_dense(dense["ggn"], 5.0), B)
    assert relative_error(inverse @ B, expected) < SOLVE_RTOL


def test_inverse_takes_and_returns_parameter_lists(problem, dense):
    operator = build("ggn", problem)
    inverse = cola.linalg.inv(operator + 0.1 * cola.ops.I_like(operator))
    gradient = [torch.randn_like(p) for p in problem[2]]
    solution = inverse @ gradient
    assert [s.shape for s in solution] == [p.shape for p in problem[2]]
    flat = torch.cat([s.flatten() for s in solution])
    expected = torch.linalg.solve(
        shifted_dense(dense["ggn"], 0.1), torch.cat([g.flatten() for g in gradient])
    )
    assert relative_error(flat, expected) < SOLVE_RTOL


@pytest.mark.parametrize("alg_type", [cc.CG, cc.MINRES, cc.Neumann])
def test_stopping_short_warns_or_raises_with_the_residual_reached(problem, alg_type):
    operator = build("ggn", problem)
    damped = operator + 1e-3 * cola.ops.I_like(operator)
    b = torch.randn(operator.shape[0], dtype=F64)
    with pytest.warns(cc.ConvergenceWarning, match=r"relative residual \d\.\d\de[-+]\d\d > tol"):
        cola.linalg.inv(damped, alg=alg_type(max_iters=3)) @ b
    with pytest.raises(cc.ConvergenceError, match="relative residual"):
        cola.linalg.inv(damped, alg=alg_type(max_iters=3, on_failure="raise")) @ b


def test_cg_refuses_an_indefinite_operator(problem):
    hessian = build("hessian", problem)
    b = torch.randn(hessian.shape[0], dtype=F64)
    with pytest.raises(ValueError, match="not positive definite"):
        cola.linalg.inv(hessian, alg=cc.CG()) @ b


@pytest.mark.parametrize("bad", [dict(tol=0), dict(max_iters=0), dict(on_failure="ignore")])
def test_solver_options_are_checked(bad):
    with pytest.raises(ValueError):
        cc.CG(**bad)


@pytest.mark.parametrize(
    ("name", "which"),
    [("ggn", "LA"), ("ggn", "SA"), ("hessian", "LA"), ("hessian", "SA"), ("hessian", "LM")],
)
def test_extreme_eigenpairs_match_eigvalsh(problem, dense, name, which):
    operator = build(name, problem)
    matrix = dense[name]
    exact = torch.linalg.eigvalsh(matrix)
    key = {"LA": -exact, "SA": exact, "LM": -exact.abs()}[which]
    expected = exact[torch.argsort(key)[:5]]
    values, vectors = cola.linalg.eig(operator, 5, which)
    assert (values - expected).abs().max() < EIG_ATOL
    V = vectors.to_dense()
    assert (V.T @ V - torch.eye(5, dtype=F64)).abs().max() < 1e-10
    assert (matrix @ V - V * values).norm(dim=0).max() < 1e-6 * exact.abs().max()


def test_lanczos_restarts_on_breakdown_and_finds_multiplicities():
    # one example, one MSE output: GGN = g gᵀ has rank 1, so G + λI has eigenvalues
    # λ (D - 1 times) and λ + ‖g‖²; the Krylov space of any start vector has dimension 2
    model, loss_func, params, data = mlp_problem(num_examples=1, loss="mse")
    model[2] = nn.Linear(6, 1).to(F64)
    params = list(model.parameters())
    data = [(data[0][0], data[0][1][:, :1])]
    operator = cc.GGN(model, loss_func, params, data)
    damped = operator + 0.25 * cola.ops.I_like(operator)
    values, vectors = cola.linalg.eig(damped, 5, "SA")
    assert not torch.isnan(values).any() and not torch.isnan(vectors.to_dense()).any()
    assert (values - 0.25).abs().max() < 1e-10
    V = vectors.to_dense()
    assert (V.T @ V - torch.eye(5, dtype=F64)).abs().max() < 1e-10
    top, _ = cola.linalg.eig(damped, 1, "LA")
    dense_ggn = reference.dense_ggn(model, loss_func, params, data).detach()
    assert abs(top[0] - 0.25 - torch.trace(dense_ggn)) < 1e-10


def test_eig_warns_when_lanczos_runs_out_of_steps(problem):
    hessian = build("hessian", problem)
    with pytest.warns(cc.ConvergenceWarning, match="Lanczos found"):
        cola.linalg.eig(hessian, 3, "SM", alg=cc.LanczosEig(max_iters=6))


@pytest.mark.parametrize("bad", [dict(k=0, which="LA"), dict(k=3, which="XX")])
def test_eig_checks_its_arguments(problem, bad):
    with pytest.raises(ValueError):
        cola.linalg.eig(build("ggn", problem), bad["k"], bad["which"])


@pytest.mark.parametrize("shift", [1e-2, 0.3])
def test_logdet_of_damped_ggn_by_slq_keeps_its_negative_sign(shift):
    # mean cross-entropy: most eigenvalues of G + λI lie below 1, so log det < 0
    problem = mlp_problem(loss="ce")
    operator = build("ggn", problem)
    damped = operator + shift * cola.ops.I_like(operator)
    dense_ggn = reference.dense_ggn(*problem).detach()
    sign, expected = torch.linalg.slogdet(shifted_dense(dense_ggn, shift))
    assert sign == 1 and expected < 0
    estimate = cola.linalg.logdet(damped, cc.SLQ(num_probes=30, num_steps=30))
    assert estimate < 0
    assert abs(estimate - expected) / abs(expected) < 0.03
    default_sign, default_estimate = cola.linalg.slogdet(damped)
    assert default_sign == 1 and default_estimate < 0
    assert abs(default_estimate - expected) / abs(expected) < 0.05


def test_logdet_never_densifies_a_matrix_free_operator(problem, monkeypatch):
    operator = build("ggn", problem)
    damped = operator + 0.1 * cola.ops.I_like(operator)
    calls = []
    original = cc.GGN._matmat
    monkeypatch.setattr(
        cc.GGN, "_matmat", lambda self, X: calls.append(X.shape) or original(self, X)
    )
    cola.linalg.logdet(damped, cc.SLQ(num_probes=4, num_steps=5))
    assert calls == [(operator.shape[0], 4)] * 5


def test_determinant_sign_of_an_indefinite_operator_is_right_or_declared_unknown(problem, dense):
    hessian = build("hessian", problem)
    damped = hessian + 0.05 * cola.ops.I_like(hessian)
    true_sign, true_log = torch.linalg.slogdet(shifted_dense(dense["hessian"], 0.05))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sign, log_abs = cola.linalg.slogdet(damped, cc.SLQ(num_probes=40, num_steps=45))
    assert abs(log_abs - true_log) / abs(true_log) < 0.1
    if torch.isnan(sign):
        assert any(issubclass(w.category, cc.ConvergenceWarning) for w in caught)
    else:
        assert sign == true_sign


@pytest.mark.parametrize("c", [2.0, 0.5, -3.0])
@pytest.mark.parametrize("dimension", [4, 5])
def test_cola_logdet_of_a_multiple_of_identity_counts_the_dimension(c, dimension):
    A = cola.ops.Dense(torch.eye(dimension, dtype=F64))
    for operator in [c * cola.ops.I_like(A), cola.ops.ScalarMul(c, (dimension, dimension), F64)]:
        sign, log_abs = cola.linalg.slogdet(operator)
        assert abs(log_abs - dimension * np.log(abs(c))) < 1e-12
        assert sign == np.sign(c) ** dimension
    assert abs(cola.linalg.logdet(2.0 * cola.ops.I_like(A)) - dimension * np.log(2)) < 1e-12


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_trace_and_diagonal_rules_estimate_and_shift_exactly(problem, dense, name):
    operator = build(name, problem)
    matrix = dense[name]
    D = operator.shape[0]
    assert cola.linalg.trace(operator) == cc.estimators.xtrace(operator, cc.XTrace())
    for alg in [cc.Hutchinson(), cc.HutchPlusPlus(), cc.XTrace()]:
        damped = operator + 0.7 * cola.ops.I_like(operator)
        assert torch.isclose(
            cola.linalg.trace(damped, alg), cola.linalg.trace(operator, alg) + 0.7 * D
        )
    # a sketch of D test vectors spans everything: Hutch++ (3D), XTrace and XDiag (2D) are exact
    for alg in [cc.HutchPlusPlus(num_matvecs=3 * D), cc.XTrace(num_matvecs=2 * D)]:
        assert abs(cola.linalg.trace(operator, alg) - matrix.trace()) < 1e-9 * D
    exact_diagonal = cola.linalg.diag(operator, alg=cc.XDiag(num_matvecs=2 * D))
    assert (exact_diagonal - matrix.diagonal()).abs().max() < 1e-10 * D
    damped_diagonal = cola.linalg.diag(operator + 0.7 * cola.ops.I_like(operator))
    assert torch.allclose(damped_diagonal, cola.linalg.diag(operator) + 0.7)
    exact = cola.linalg.trace(operator, cola.linalg.Exact())
    assert abs(exact - matrix.trace()) < 1e-10


def test_sketching_estimators_beat_hutchinson_on_a_low_rank_ggn():
    # 3 examples and 3 classes: the GGN of the 45 parameters has rank ≤ 6
    problem = mlp_problem(num_examples=3, loss="ce")
    operator = build("ggn", problem)
    exact = reference.dense_ggn(*problem).detach()

    def median_error(alg_type):
        errors = [
            (cola.linalg.trace(operator, alg_type(num_matvecs=24, seed=s)) - exact.trace()).abs()
            for s in range(10)
        ]
        return torch.stack(errors).median()

    hutchinson = median_error(cc.Hutchinson)
    assert hutchinson > 1e-3 * exact.trace()
    assert median_error(cc.HutchPlusPlus) < 1e-10 * exact.trace()  # sketch of 8 ≥ rank
    assert median_error(cc.XTrace) < 1e-10 * exact.trace()  # 12 test vectors > rank
    diagonal = cola.linalg.diag(operator, alg=cc.XDiag(num_matvecs=24))
    assert (diagonal - exact.diagonal()).abs().max() < 1e-10 * exact.diagonal().abs().max()


def test_our_solvers_run_on_any_symmetric_cola_operator(problem, dense):
    # a Sum of two curvatures has no structured rule: cc.CG solves it matrix-free
    operator = build("ggn", problem)
    kfac = cc.KFAC(*problem)
    total = kfac + operator + 0.5 * cola.ops.I_like(operator)
    inverse = cola.linalg.inv(total, alg=cc.CG(tol=1e-11, max_iters=500))
    b = torch.randn(operator.shape[0], 2, dtype=F64)
    expected = torch.linalg.solve(kfac.to_dense() + shifted_dense(dense["ggn"], 0.5), b)
    assert relative_error(inverse @ b, expected) < SOLVE_RTOL
    diagonal = cola.ops.Diagonal(torch.rand(5, dtype=F64) + 1)
    assert isinstance(cola.linalg.inv(diagonal, alg=cc.CG()), cola.ops.Diagonal)  # exact rule
