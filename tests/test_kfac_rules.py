"""The structured dispatch rules on KFAC / EKFAC against the same functions on dense matrices."""

import cola
import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.operators import kronecker_algebra as kronecker
from tests._tols import EXACT_RTOL

F64 = torch.float64
DAMPING = 0.05


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def build(operator_type):
    """A Kronecker-factored curvature of a tanh MLP with params out of order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    X, y = torch.randn(7, 3, dtype=F64), torch.randint(0, 3, (7,))
    params = [model[2].weight, model[0].bias, model[0].weight, model[2].bias]
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    return operator_type(model, nn.CrossEntropyLoss(), params, data)


@pytest.fixture(scope="module", params=[cc.KFAC, cc.EKFAC], ids=["kfac", "ekfac"])
def operator(request):
    return build(request.param)


def damped_dense(operator):
    return operator.to_dense() + DAMPING * torch.eye(operator.shape[0], dtype=F64)


def test_damping_keeps_the_structure_whichever_way_it_is_written(operator):
    eye = cola.ops.I_like(operator)
    expected = damped_dense(operator)
    for damped in [
        operator + DAMPING * eye,
        DAMPING * eye + operator,
        eye * DAMPING + operator,
        operator.damped(DAMPING),
    ]:
        assert isinstance(damped, cc.KroneckerFactored)
        assert relative_error(damped.to_dense(), expected) < EXACT_RTOL
    assert isinstance(operator + eye, cc.KroneckerFactored)


def test_inverse_is_exact_and_structured_even_when_cg_is_asked_for(operator):
    damped = operator + DAMPING * cola.ops.I_like(operator)
    b = torch.randn(operator.shape[0], 2, dtype=F64)
    expected = torch.linalg.solve(damped_dense(operator), b)
    for alg in [cola.linalg.Auto(), cola.linalg.CG()]:
        inverse = cola.linalg.inv(damped, alg=alg)
        assert isinstance(inverse, cc.KroneckerFactored)
        assert relative_error(inverse @ b, expected) < EXACT_RTOL


def test_inverse_of_a_singular_operator_asks_for_damping(operator):
    singular = operator.map_spectrum(lambda s: s * 0)
    with pytest.raises(ValueError, match="damped"):
        cola.linalg.inv(singular)


def test_logdet_and_slogdet(operator):
    damped = operator + DAMPING * cola.ops.I_like(operator)
    expected = torch.logdet(damped_dense(operator))
    assert abs(cola.linalg.logdet(damped) - expected) < EXACT_RTOL * abs(expected)
    shifted = operator.map_spectrum(lambda s: s - 0.5 * s.max())
    sign, logabs = cola.linalg.slogdet(shifted)
    expected_sign, expected_logabs = torch.linalg.slogdet(shifted.to_dense())
    assert sign == expected_sign
    assert abs(logabs - expected_logabs) < 1e-8 * abs(expected_logabs)


@pytest.mark.parametrize("which", ["LM", "SM", "LA", "SA"])
def test_eig_returns_the_selected_eigenpairs(operator, which):
    damped = operator + DAMPING * cola.ops.I_like(operator)
    values, vectors = cola.linalg.eig(damped, 4, which=which)
    dense = damped_dense(operator)
    spectrum = torch.linalg.eigvalsh(dense)
    expected = spectrum[-4:].flip(0) if which in ("LM", "LA") else spectrum[:4]
    assert torch.allclose(values, expected, rtol=1e-10, atol=1e-12)
    V = vectors.to_dense()
    assert torch.allclose(dense @ V, V * values, atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=F64), atol=1e-10)


def test_trace_and_diagonal(operator):
    dense = operator.to_dense()
    assert abs(cola.linalg.trace(operator) - dense.trace()) < EXACT_RTOL * dense.trace()
    assert relative_error(cola.linalg.diag(operator), dense.diag()) < EXACT_RTOL


def test_sqrt_and_inverse_sqrt(operator):
    damped = operator + DAMPING * cola.ops.I_like(operator)
    root = cola.linalg.sqrt(damped)
    inverse_root = cola.linalg.isqrt(damped)
    assert isinstance(root, cc.KroneckerFactored)
    assert relative_error(root.to_dense() @ root.to_dense(), damped_dense(operator)) < 1e-9
    identity = torch.eye(operator.shape[0], dtype=F64)
    product = inverse_root.to_dense() @ damped_dense(operator) @ inverse_root.to_dense()
    assert relative_error(product, identity) < 1e-9


def test_heuristic_damping_follows_the_pi_rule():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2)).to(F64)
    X, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    kfac = cc.KFAC(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    G, A = kfac.blocks[0].output_factor, kfac.blocks[0].input_factor
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])) ** 0.5
    root = DAMPING**0.5
    block = torch.kron(
        G + root / pi * torch.eye(2, dtype=F64), A + root * pi * torch.eye(4, dtype=F64)
    )
    expected = block[kfac.inverse_permutation][:, kfac.inverse_permutation]
    damped = kfac.damped(DAMPING, mode="heuristic")
    assert relative_error(damped.to_dense(), expected) < EXACT_RTOL
    inverse = cola.linalg.inv(damped).to_dense()
    assert relative_error(inverse, torch.linalg.inv(expected)) < 1e-9
    with pytest.raises(ValueError, match="damping mode"):
        kfac.damped(DAMPING, mode="pi")


def test_heuristic_damping_is_refused_for_ekfac():
    with pytest.raises(ValueError, match="mode='exact'"):
        build(cc.EKFAC).damped(DAMPING, mode="heuristic")


def test_pinv_zeroes_the_null_space(operator):
    singular = operator.map_spectrum(lambda s: torch.where(s > s.median(), s, 0 * s))
    expected = torch.linalg.pinv(singular.to_dense(), hermitian=True)
    result = cola.linalg.pinv(singular)
    assert isinstance(result, cc.KroneckerFactored)
    assert relative_error(result.to_dense(), expected) < 1e-9


def test_negative_damping_is_rejected(operator):
    with pytest.raises(ValueError, match="non-negative"):
        operator.damped(-1.0)


def spd(n, seed):
    generator = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, dtype=F64, generator=generator)
    return M @ M.T + 0.1 * torch.eye(n, dtype=F64)


def test_user_built_kronecker_and_block_diagonal_get_the_structured_rules():
    G, A, B = spd(3, 0), spd(4, 1), spd(2, 2)
    kron = cola.ops.Kronecker(cola.ops.Dense(G), cola.ops.Dense(A))
    block_diagonal = cola.ops.BlockDiag(kron, cola.ops.Dense(B))
    dense = torch.block_diag(torch.kron(G, A), B) + DAMPING * torch.eye(14, dtype=F64)
    for damped in [
        block_diagonal + DAMPING * cola.ops.I_like(block_diagonal),
        DAMPING * cola.ops.I_like(block_diagonal) + block_diagonal,
    ]:
        assert isinstance(damped, cc.KroneckerFactored)
        assert relative_error(damped.to_dense(), dense) < EXACT_RTOL
        assert relative_error(cola.linalg.inv(damped).to_dense(), torch.linalg.inv(dense)) < 1e-9
        assert abs(cola.linalg.logdet(damped) - torch.logdet(dense)) < 1e-10 * abs(
            torch.logdet(dense)
        )
    damped_kron = kron + DAMPING * cola.ops.I_like(kron)
    assert isinstance(damped_kron, cc.KroneckerFactored)
    assert damped_kron.isa(cola.PSD)


def test_a_non_symmetric_kronecker_is_left_to_cola():
    generator = torch.Generator().manual_seed(3)
    kron = cola.ops.Kronecker(
        cola.ops.Dense(torch.randn(3, 3, dtype=F64, generator=generator)), cola.ops.Dense(spd(2, 4))
    )
    damped = kron + DAMPING * cola.ops.I_like(kron)
    assert not isinstance(damped, cc.KroneckerFactored)
    expected = kron.to_dense() + DAMPING * torch.eye(6, dtype=F64)
    assert relative_error(damped.to_dense(), expected) < EXACT_RTOL


def test_structure_is_real_on_a_million_parameters():
    """A 1000-1000-10 MLP (10⁶ parameters): inverse, logdet and diagonal from the factors."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    X, y = torch.randn(16, 1000), torch.randint(0, 10, (16,))
    kfac = cc.KFAC(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    damped = kfac + 1e-2 * cola.ops.I_like(kfac)
    inverse = cola.linalg.inv(damped)
    v = torch.randn(kfac.shape[0])
    x = inverse @ v
    assert kfac.shape == (1_011_010, 1_011_010)
    assert isinstance(inverse, cc.KroneckerFactored)
    assert torch.allclose(damped @ x, v, rtol=1e-3, atol=1e-3)
    assert torch.isfinite(cola.linalg.logdet(damped))
    assert cola.linalg.diag(damped).shape == (1_011_010,)


def test_all_eigenpairs_and_cached_factor_eigendecompositions():
    kfac = build(cc.KFAC)
    D = kfac.shape[0]
    values, vectors = cola.linalg.eig(kfac, D, which="LA")
    dense = kfac.to_dense()
    assert torch.allclose(values, torch.linalg.eigvalsh(dense).flip(0), rtol=1e-10, atol=1e-12)
    V = vectors.to_dense()
    assert torch.allclose(V.T @ V, torch.eye(D, dtype=F64), atol=1e-10)
    assert torch.allclose(dense @ V, V * values, atol=1e-10)
    first = [block.eigen() for block in kfac.blocks]
    cola.linalg.inv(kfac + DAMPING * cola.ops.I_like(kfac))
    cola.linalg.logdet(kfac + 2 * DAMPING * cola.ops.I_like(kfac))
    assert all(block.eigen() is eigen for block, eigen in zip(kfac.blocks, first, strict=True))


def test_heuristic_damping_logdet_trace_and_diag():
    damped = build(cc.KFAC).damped(DAMPING, mode="heuristic")
    dense = damped.to_dense()
    assert abs(cola.linalg.logdet(damped) - torch.logdet(dense)) < 1e-10 * abs(torch.logdet(dense))
    assert abs(cola.linalg.trace(damped) - dense.trace()) < EXACT_RTOL * dense.trace()
    assert relative_error(cola.linalg.diag(damped), dense.diag()) < EXACT_RTOL


def test_scalar_multiples_stay_structured_and_differentiable():
    kfac = build(cc.KFAC)
    dense = kfac.to_dense()
    for scaled, expected in [(2.5 * kfac, 2.5 * dense), (kfac / 4, dense / 4), (-kfac, -dense)]:
        assert isinstance(scaled, cc.KroneckerFactored)
        assert relative_error(scaled.to_dense(), expected) < EXACT_RTOL
    assert not (-kfac).isa(cola.PSD)
    assert (2.5 * kfac).isa(cola.PSD)
    sigma = torch.tensor(1.5, dtype=F64, requires_grad=True)
    delta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    logdet = cola.linalg.logdet(kfac.scaled(1 / sigma**2).damped(delta))
    logdet.backward()
    sigma_ref = sigma.detach().clone().requires_grad_(True)
    delta_ref = delta.detach().clone().requires_grad_(True)
    identity = torch.eye(kfac.shape[0], dtype=F64)
    reference = torch.logdet(dense / sigma_ref**2 + delta_ref * identity)
    reference.backward()
    assert abs(logdet - reference) < 1e-10 * abs(reference)
    assert torch.allclose(sigma.grad, sigma_ref.grad, rtol=1e-9)
    assert torch.allclose(delta.grad, delta_ref.grad, rtol=1e-9)


def test_two_factor_blocks_invert_as_factor_inverses_without_a_new_eigendecomposition(
    monkeypatch,
):
    kfac = build(cc.KFAC)
    calls = []
    original = kronecker.symmetric_eigh
    monkeypatch.setattr(kronecker, "symmetric_eigh", lambda m: calls.append(m) or original(m))
    for damped in [kfac.damped(DAMPING, mode="heuristic"), (2.5 * kfac).damped(1.0, "heuristic")]:
        inverse = cola.linalg.inv(damped)
        assert all(isinstance(block, cc.KroneckerBlock) for block in inverse.blocks)
        expected = torch.linalg.inv(damped.to_dense())
        assert relative_error(inverse.to_dense(), expected) < 1e-9
        b = torch.randn(kfac.shape[0], 3, dtype=F64)
        assert relative_error(inverse @ b, expected @ b) < 1e-9
        spectrum = torch.linalg.eigvalsh(expected)
        assert torch.allclose(inverse.eigenvalues().sort().values, spectrum, rtol=1e-9)
        for block in [*damped.blocks, *inverse.blocks]:
            (values_out, q_out), (values_in, q_in) = block.factor_eigh()
            assert relative_error((q_out * values_out) @ q_out.T, block.output_factor) < 1e-12
            assert relative_error((q_in * values_in) @ q_in.T, block.input_factor) < 1e-12
    assert len(calls) == 2 * len(kfac.blocks)
