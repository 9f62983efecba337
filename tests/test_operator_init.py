"""The Kronecker operators set their CoLA state directly: it must equal CoLA's constructors'."""

from __future__ import annotations

import cola
import pytest
import torch
from cola.annotations import PSD, get_annotations
from cola.ops import BlockDiag, Dense, Diagonal, Kronecker
from torch import nn

import cola_curvature as cc
from cola_curvature.operators.kronecker import KroneckerFactored, _inverse_permutation
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, EigenKronecker, KroneckerBlock


def _symmetric(size: int, seed: int) -> torch.Tensor:
    matrix = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    return (matrix @ matrix.T).double()


def _assert_same_state(ours: cola.ops.LinearOperator, cola_built: cola.ops.LinearOperator) -> None:
    assert ours.dtype == cola_built.dtype
    assert tuple(ours.shape) == tuple(cola_built.shape)
    assert ours.xnp is cola_built.xnp
    assert ours.device == cola_built.device


@pytest.mark.parametrize("diagonal_input", [False, True])
def test_kronecker_block_matches_cola_kronecker(diagonal_input: bool) -> None:
    G = _symmetric(3, 0)
    A = torch.rand(4, dtype=torch.float64) if diagonal_input else _symmetric(4, 1)
    block = KroneckerBlock(G, A)
    reference = Kronecker(Dense(G), Diagonal(A) if diagonal_input else Dense(A))
    _assert_same_state(block, reference)
    assert block.annotations == reference.annotations == get_annotations(block)
    assert [type(M) for M in block.Ms] == [type(M) for M in reference.Ms]
    assert torch.equal(block.Ms[0].to_dense(), G)
    torch.testing.assert_close(block.to_dense(), reference.to_dense(), rtol=0, atol=0)


def test_eigen_and_diagonal_blocks_have_colas_annotations() -> None:
    values = torch.rand(3, 4, dtype=torch.float64)
    eigen = EigenKronecker(None, None, values)
    diagonal = DiagonalBlock(values.reshape(-1))
    for block in (eigen, diagonal):
        _assert_same_state(block, Diagonal(values.reshape(-1)))
        assert block.annotations == get_annotations(block)
        torch.testing.assert_close(block.to_dense(), torch.diag(values.reshape(-1)))


def test_kronecker_factored_matches_cola_block_diag() -> None:
    blocks = [KroneckerBlock(_symmetric(2, 2), _symmetric(3, 3)), DiagonalBlock(torch.rand(4))]
    blocks[1] = DiagonalBlock(blocks[1].values.double())
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    structured = KroneckerFactored(blocks, permutation)
    reference = BlockDiag(*blocks)
    _assert_same_state(structured, reference)
    assert structured.Ms == reference.Ms and structured.blocks == tuple(blocks)
    assert structured.multiplicities == reference.multiplicities
    assert structured.annotations == get_annotations(structured) | {PSD}
    assert KroneckerFactored(blocks, permutation, annotations=set()).annotations == set()
    torch.testing.assert_close(
        structured.inverse_permutation, _inverse_permutation(permutation, structured.xnp)
    )
    dense = reference.to_dense()[permutation.argsort()][:, permutation.argsort()]
    torch.testing.assert_close(structured.to_dense(), dense, rtol=0, atol=0)


def test_kfac_permutations_and_pytree_round_trip() -> None:
    """KFAC's NumPy-built inverse permutation equals the device scatter; EKFAC reuses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    params = [p for _, p in sorted(model.named_parameters(), reverse=True)]  # not block order
    data = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    loss = nn.CrossEntropyLoss()
    kfac = cc.KFAC(model, loss, params, data, separate_weight_and_bias=True)
    torch.testing.assert_close(
        kfac.inverse_permutation, _inverse_permutation(kfac.permutation, kfac.xnp)
    )
    ekfac = cc.EKFAC(model, loss, params, data)
    torch.testing.assert_close(
        ekfac.inverse_permutation, _inverse_permutation(ekfac.permutation, ekfac.xnp)
    )
    leaves, spec = torch.utils._pytree.tree_flatten(kfac)
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    v = torch.randn(kfac.shape[0], dtype=torch.float64)
    torch.testing.assert_close(rebuilt @ v, kfac @ v, rtol=0, atol=0)
    assert rebuilt.annotations == kfac.annotations


def test_matrix_free_operators_have_colas_annotations() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    for operator in (cc.Hessian, cc.GGN, cc.EmpiricalFisher):
        op = operator(model, nn.MSELoss(), list(model.parameters()), data)
        _assert_same_state(op, Dense(torch.zeros(8, 8, dtype=torch.float64)))
        assert op.annotations == get_annotations(op) | {operator.annotation}
