"""``separate_weight_and_bias=True``: a weight block ``G ⊗ A_W`` and a bias block ``G``.

Checked against the joint KFAC of the same model (the separated matrix is the joint one
with the weight–bias entries zeroed, since the joint ``A``'s bias entry is exactly 1),
against the dense GGN where KFAC is exact, for EKFAC against the exact GGN blocks in the
eigenbasis, and through Laplace's per-block prior. Equality with curvlinops' default KFAC
is in ``tests/test_interop.py``.
"""

import cola
import pytest
import torch
from torch import nn

import cola_curvature as cc
from tests import double_backward_reference as ref
from tests.cases import F64
from tests.test_kfac_shared_weights import (
    assert_close,
    assert_eigenvalues_are_the_exact_block_in_the_eigenbasis,
)


@pytest.fixture(scope="module")
def problem():
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).to(F64)
        X, y = torch.randn(7, 3, dtype=F64), torch.randint(0, 2, (7,))
    return model, nn.CrossEntropyLoss(), list(model.parameters()), [(X[:3], y[:3]), (X[3:], y[3:])]


def weight_bias_mask(params):
    """Return ``M[i, j] = 0`` where one of ``i, j`` is a bias entry and the other a weight
    entry of the same layer (the first Linear), else 1."""
    sizes = [p.numel() for p in params]
    mask = torch.ones(sum(sizes), sum(sizes), dtype=F64)
    weight, bias = slice(0, sizes[0]), slice(sizes[0], sizes[0] + sizes[1])
    mask[weight, bias] = mask[bias, weight] = 0
    return mask


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_separated_kfac_is_the_joint_one_without_weight_bias_terms(problem, kfac_approx):
    joint = cc.KFAC(*problem, kfac_approx=kfac_approx)
    separated = cc.KFAC(*problem, kfac_approx=kfac_approx, separate_weight_and_bias=True)
    assert len(separated.blocks) == len(joint.blocks) + 1
    roles = separated.layer_blocks()
    assert set(roles[0]) == {"weight", "bias"} and roles[1]["bias"] is None
    assert_close(roles[0]["bias"].input_factor, torch.ones(1, 1, dtype=F64))
    assert_close(roles[0]["bias"].output_factor, joint.layer_blocks()[0]["joint"].output_factor)
    expected = joint.to_dense() * weight_bias_mask(problem[2])
    assert_close(separated.to_dense(), expected)


def test_separated_rules_and_parameter_shaped_input(problem):
    separated = cc.KFAC(*problem, separate_weight_and_bias=True)
    dense = separated.to_dense()
    eye = torch.eye(dense.shape[0], dtype=F64)
    damped = separated + 0.1 * cola.ops.I_like(separated)
    assert_close(cola.linalg.inv(damped).to_dense(), torch.linalg.inv(dense + 0.1 * eye))
    assert_close(cola.linalg.logdet(damped), torch.logdet(dense + 0.1 * eye))
    vectors = [torch.ones_like(p) for p in problem[2]]
    flat = torch.cat([v.reshape(-1) for v in vectors])
    answer = separated @ vectors
    assert_close(torch.cat([a.reshape(-1) for a in answer]), dense @ flat)


def test_separated_ekfac_is_exact_in_its_eigenbasis(problem):
    ekfac = cc.EKFAC(*problem, separate_weight_and_bias=True)
    dense = ref.dense_ggn(*problem)
    for index in range(3):  # first layer's weight block, its bias block, the second layer
        block = ekfac.blocks[index]
        positions = _block_positions(ekfac, index)
        basis = torch.kron(block.q_out, block.q_in)
        expected = (basis.T @ dense[positions][:, positions] @ basis).diagonal()
        assert_close(block.eigenvalues.reshape(-1), expected)
    joint = cc.EKFAC(*problem)
    assert_eigenvalues_are_the_exact_block_in_the_eigenbasis(joint, dense, layer_index=1)


def _block_positions(operator, index):
    """Return the user-order positions of block ``index`` of a Kronecker-factored operator."""
    start = sum(block.shape[0] for block in operator.blocks[:index])
    return operator.permutation[start : start + operator.blocks[index].shape[0]]


def test_laplace_kfac_takes_a_prior_per_separated_block(problem):
    laplace = cc.Laplace(*problem, curvature="kfac", separate_weight_and_bias=True)
    curvature = laplace.curvature
    assert len(curvature.blocks) == 3
    prior = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    per_entry = torch.empty(curvature.shape[0], dtype=F64)
    for index, delta in enumerate(prior):
        per_entry[_block_positions(curvature, index)] = delta
    expected = torch.logdet(curvature.to_dense() + torch.diag(per_entry))
    assert_close(laplace.log_det_posterior_precision(prior), expected)


def test_bad_separate_weight_and_bias_is_refused(problem):
    with pytest.raises(TypeError, match="separate_weight_and_bias must be True or False"):
        cc.KFAC(*problem, separate_weight_and_bias="yes")
