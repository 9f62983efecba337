"""KFAC and EKFAC on a weight several calls use: one block, the nearest Kronecker product.

A tied lm-head (``logits = h Wᵀ`` with ``W`` the token embedding) and a layer applied twice
get, per use, the block of that use alone; the shared block is checked against

- the Frobenius-nearest Kronecker product computed densely (rank-one SVD of the
  rearranged sum, Van Loan & Pitsianis) of the per-use blocks, which come from an untied
  twin with the same weights (so each use's statistics are those of an ordinary layer);
- for EKFAC, the diagonal of the exact dense GGN / empirical Fisher block of the shared
  weight in the block's Kronecker eigenbasis (double-backward references);
- torch against JAX on the GPT twin with the same weights.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from cola.backends import get_library_fns
from torch import nn

import cola_curvature as cc
from cola_curvature.kfac_statistics.shared_weights import SharedWeightLayer, nearest_kronecker
from cola_curvature.operators.kfac import block_permutation
from cola_curvature.operators.kronecker_algebra import symmetric_eigh
from tests import double_backward_reference as ref
from tests.cases import F64
from tests.test_real_architectures import build, tiny_gpt

RTOL = 1e-10


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = torch.as_tensor(np.asarray(actual)), torch.as_tensor(np.asarray(expected))
    scale = expected.abs().max()
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, error / scale


def as_matrix(factor):
    """Return a factor as a dense matrix (a 1-d factor is its diagonal)."""
    factor = torch.as_tensor(np.asarray(factor))
    return torch.diag(factor) if factor.ndim == 1 else factor


def best_kronecker(terms):
    """Return the dense nearest Kronecker product to ``Σ B ⊗ C`` by SVD of the rearrangement."""
    (m, n) = (as_matrix(terms[0][0]).shape[0], as_matrix(terms[0][1]).shape[0])
    total = sum(torch.kron(as_matrix(b), as_matrix(c)) for b, c in terms)
    rearranged = total.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    u, s, vt = torch.linalg.svd(rearranged)
    x, y = (s[0] * u[:, 0]).reshape(m, m), vt[0].reshape(n, n)
    return torch.kron(x, y)


def random_psd(generator, size, rank=None):
    root = torch.randn(size, rank or size, generator=generator, dtype=F64)
    return root @ root.T


@pytest.mark.usefixtures("jax_float64")
@pytest.mark.parametrize("library", ["torch", "jax"])
@pytest.mark.parametrize("terms", [2, 3])
def test_nearest_kronecker_is_the_best_rank_one_term_and_psd(library, terms):
    generator = torch.Generator().manual_seed(terms)
    pairs = [(random_psd(generator, 4, 2), random_psd(generator, 3)) for _ in range(terms - 1)]
    pairs.append((torch.rand(4, generator=generator, dtype=F64), random_psd(generator, 3, 1)))
    if library == "jax":
        pairs = [(jnp.asarray(b.numpy()), jnp.asarray(c.numpy())) for b, c in pairs]
    x, y = nearest_kronecker(pairs)
    assert_close(torch.kron(as_matrix(x), as_matrix(y)), best_kronecker(pairs))
    for factor in (as_matrix(x), as_matrix(y)):
        assert torch.linalg.eigvalsh(factor).min() >= -1e-12 * torch.linalg.eigvalsh(factor).max()


def test_nearest_kronecker_is_exact_when_one_use_vanishes_or_factors_agree():
    generator = torch.Generator().manual_seed(0)
    b, c, other = random_psd(generator, 4), random_psd(generator, 3), random_psd(generator, 3)
    x, y = nearest_kronecker([(b, c), (torch.zeros(4, dtype=F64), other)])
    assert_close(torch.kron(x, y), torch.kron(b, c))
    x, y = nearest_kronecker([(b, c), (b, other)])  # a shared row factor: B ⊗ (C + C')
    assert_close(torch.kron(x, y), torch.kron(b, c + other))


# --- the tied GPT: lm-head = token embedding ---------------------------------------------


def untied_twin(model):
    """Return the untied GPT with the same weights (the lm-head a copy of the table)."""
    twin = tiny_gpt(tie_weights=False)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.fixture(scope="module")
def tied():
    return build("gpt-sdpa-tied", "sum")


@pytest.mark.parametrize(
    ("fisher_type", "kfac_approx"),
    [("type-2", "expand"), ("type-2", "reduce"), ("empirical", "expand"), ("mc", "expand")],
)
def test_the_tied_block_is_the_nearest_kronecker_product_of_the_untied_blocks(
    tied, fisher_type, kfac_approx
):
    model, loss, params, data = tied
    options = {"fisher_type": fisher_type, "kfac_approx": kfac_approx, "uncovered": "diagonal"}
    kfac = cc.KFAC(model, loss, params, data, **options)
    shared = kfac.layers[0]
    assert isinstance(shared, SharedWeightLayer) and shared.name == "wte"
    assert [use.kind for use in shared.uses] == ["embedding", "linear"]
    twin = untied_twin(model)
    untied = cc.KFAC(twin, loss, list(twin.parameters()), data, **options)
    blocks = {layer.name: block for layer, block in zip(untied.layers, untied.blocks, strict=False)}
    embedding, head = blocks["wte"], blocks["lm_head"]
    # the embedding's block is on Wᵀ: on W it is diag(counts) ⊗ G_emb
    terms = [
        (head.output_factor, head.input_factor),
        (embedding.input_factor, embedding.output_factor),
    ]
    block = kfac.blocks[0]
    assert_close(torch.kron(block.output_factor, block.input_factor), best_kronecker(terms))


def exact_block(operator, dense, layer):
    """Return the rows and columns of ``dense`` (user order) of ``layer``'s block order."""
    sizes = [p.numel() for p in operator._backend._params]
    offsets = np.cumsum([0, *sizes])[:-1]
    positions = torch.as_tensor(block_permutation(layer, offsets))
    return dense[positions][:, positions]


def assert_eigenvalues_are_the_exact_block_in_the_eigenbasis(ekfac, dense, layer_index=0):
    block, layer = ekfac.blocks[layer_index], ekfac.layers[layer_index]
    basis = torch.kron(block.q_out, block.q_in)
    expected = (basis.T @ exact_block(ekfac, dense, layer) @ basis).diagonal()
    assert_close(block.eigenvalues.reshape(-1), expected)


def test_ekfac_refits_the_tied_block_to_the_exact_ggn_in_its_eigenbasis(tied):
    ekfac = cc.EKFAC(*tied, uncovered="diagonal")
    assert isinstance(ekfac.layers[0], SharedWeightLayer)
    assert_eigenvalues_are_the_exact_block_in_the_eigenbasis(ekfac, ref.dense_ggn(*tied))


def test_shared_weights_uncovered_leaves_the_tied_weight_to_uncovered(tied):
    kfac = cc.KFAC(*tied, uncovered="diagonal", shared_weights="uncovered")
    assert all(not isinstance(layer, SharedWeightLayer) for layer in kfac.layers)
    with pytest.raises(ValueError, match="'kronecker', 'uncovered'"):
        cc.KFAC(*tied, uncovered="diagonal", shared_weights="tied")


class BiasedTiedHead(nn.Module):
    """An embedding whose weight is also a biased output layer (``F.linear(h, W, b)``)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embedding(tokens)))


def test_a_tied_head_with_its_own_bias_is_left_uncovered_with_the_reason():
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = BiasedTiedHead().to(F64)
        X, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="embedding.weight.*different biases"):
        cc.KFAC(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])


# --- a layer applied twice (weight and bias shared by both calls) ---------------------------


@pytest.fixture(scope="module")
def reused_layer():
    with torch.random.fork_rng():
        torch.manual_seed(8)
        layer = nn.Linear(3, 3).to(F64)
        model = nn.Sequential(layer, nn.Tanh(), layer)
        X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    return (
        model,
        nn.MSELoss(reduction="sum"),
        list(model.parameters()),
        [(X[:2], y[:2]), (X[2:], y[2:])],
    )


def test_a_layer_applied_twice_is_one_shared_block_of_both_calls(reused_layer):
    kfac = cc.KFAC(*reused_layer)
    (layer,) = kfac.layers
    assert isinstance(layer, SharedWeightLayer)
    assert (layer.weight_index, layer.bias_index) == (0, 1)
    assert [use.call_index for use in layer.uses] == [0, 1]


def test_a_module_registered_twice_keeps_its_parameters(reused_layer):
    """torch's ``functional_call`` leaves a substitute in a module registered under two
    names; the backend puts the user's parameters back."""
    model, loss, params, data = reused_layer
    cc.KFAC(model, loss, params, data)
    cc.GGN(model, loss, params, data) @ torch.ones(sum(p.numel() for p in params), dtype=F64)
    assert model[0].weight is params[0] and model[2].bias is params[1]
    assert isinstance(model[0].weight, nn.Parameter)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_ekfac_on_a_layer_applied_twice_is_exact_in_its_eigenbasis(reused_layer, fisher_type):
    ekfac = cc.EKFAC(*reused_layer, fisher_type=fisher_type)
    if fisher_type == "type-2":
        dense = ref.dense_ggn(*reused_layer)
    else:
        dense = ref.dense_empirical_fisher(*reused_layer)
    assert_eigenvalues_are_the_exact_block_in_the_eigenbasis(ekfac, dense)


# --- torch and JAX on the tied GPT twin ---------------------------------------------------


@pytest.mark.usefixtures("jax_float64")
@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_jax_and_torch_agree_on_the_tied_gpt(operator_type):
    from tests.test_models_jax import FAST, operator_arguments, torch_gpt, vectors

    torch_args, jax_args, perm = operator_arguments(torch_gpt())
    V, V_jax = vectors(perm)
    torch_operator = operator_type(*torch_args, uncovered="diagonal", **FAST)
    jax_operator = operator_type(*jax_args, uncovered="diagonal", **FAST)
    assert jax_operator.layers[0].kind == torch_operator.layers[0].kind == "shared"
    expected = (torch_operator @ V).numpy()[perm]
    assert_close(jax_operator @ V_jax, expected)


# --- eigendecompositions that the backend's solver fails on ---------------------------------


def test_a_failed_eigensolver_falls_back_to_the_host(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    matrix = random_psd(generator, 6, 2)
    expected_values, _ = symmetric_eigh(matrix)
    xnp = get_library_fns(matrix.dtype)

    def fails(_):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(xnp, "eigh", fails)
    values, vectors = symmetric_eigh(matrix)
    assert_close(values, expected_values)
    assert_close((vectors * values) @ vectors.T, matrix)
    monkeypatch.setattr(xnp, "eigh", lambda m: (m[0] * torch.nan, m))  # JAX's NaN answer
    values, vectors = symmetric_eigh(matrix)
    assert_close((vectors * values) @ vectors.T, matrix)
    with pytest.raises(ValueError, match="non-finite"):
        symmetric_eigh(matrix * torch.nan)


@pytest.mark.usefixtures("jax_float64")
@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_jax_and_torch_agree_on_a_layer_applied_twice(reused_layer, operator_type):
    model, loss, params, data = reused_layer
    weight, bias = (jnp.asarray(p.detach().numpy()) for p in params)

    def model_fn(p, x):
        hidden = jnp.tanh(x @ p["w"].T + p["b"])
        return hidden @ p["w"].T + p["b"]

    jax_data = [(jnp.asarray(X.numpy()), jnp.asarray(y.numpy())) for X, y in data]
    jax_params = {"b": bias, "w": weight}  # flat order: b, then w
    jax_operator = operator_type(model_fn, cc.losses.MSE(reduction="sum"), jax_params, jax_data)
    torch_operator = operator_type(model, loss, params, data)
    assert jax_operator.layers[0].kind == "shared"
    size = weight.size
    order = np.concatenate([np.arange(size, size + bias.size), np.arange(size)])
    expected = torch_operator.to_dense().numpy()[np.ix_(order, order)]
    assert_close(jax_operator.to_dense(), expected)
