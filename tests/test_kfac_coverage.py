"""KFAC and EKFAC cover every parameter of real models: Kronecker, diagonal or dense blocks.

Parameters no Kronecker layer owns (norm scales and shifts, BatchNorm affine, position
embeddings, a tied lm-head) get the exact curvature diagonal with ``uncovered="diagonal"``;
the references are dense double-backward matrices (``tests/double_backward_reference.py``).
Where KFAC is not exact, only the structure and the rules against ``K.to_dense()`` of the
same operator are checked.
"""

import cola
import numpy as np
import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.models.gpt import RMSNorm
from cola_curvature.operators import kfac as kfac_module
from cola_curvature.operators.kronecker_blocks import DiagonalBlock, KroneckerBlock
from cola_curvature.options import Uncovered
from tests import double_backward_reference as ref
from tests import test_real_architectures as real_architectures
from tests.cases import F64
from tests.test_real_architectures import tiny_gpt, tiny_resnet

RTOL = 1e-9
DAMPING = 0.3

MODELS = {
    "gpt-sdpa-tied": lambda: tiny_gpt(),
    "gpt-sdpa-untied": lambda: tiny_gpt(tie_weights=False),
    "resnet-bn-eval": tiny_resnet,
}


def build(name, reduction="sum"):
    """Return ``(model, loss, params, data)`` with 6 examples in uneven batches."""
    return real_architectures.build(name, reduction, MODELS)


def assert_close(actual, expected, rtol=RTOL):
    scale = expected.abs().max()
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, error / scale


NORMS = (nn.LayerNorm, nn.BatchNorm2d, RMSNorm)


def uncovered_indices(model, params):
    """Return the positions in ``params`` no Kronecker layer should own.

    Norm scales and shifts and the position table (``wpe(arange(T))`` is shared by all
    examples); a weight tied between the embedding and the lm-head has a shared block.
    """
    expected = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    if hasattr(model, "wpe"):
        expected.add(id(model.wpe.weight))
    return {i for i, p in enumerate(params) if id(p) in expected}


def entry_positions(params, indices):
    """Return the flat entries of ``params[i]`` for ``i`` in ``indices``, in order."""
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in sorted(indices)])


@pytest.fixture(scope="module", params=list(MODELS))
def diagonal_kfac(request):
    """Return ``(problem, K, dense GGN, positions of the uncovered entries)``."""
    problem = build(request.param)
    model, _, params, _ = problem
    uncovered = uncovered_indices(model, params)
    kfac = cc.KFAC(*problem, uncovered="diagonal")
    return problem, kfac, ref.dense_ggn(*problem), entry_positions(params, uncovered)


def test_every_parameter_is_in_a_kronecker_or_the_diagonal_block(diagonal_kfac):
    (model, _, params, _), kfac, _, uncovered = diagonal_kfac
    owned = set(range(len(params))) - uncovered_indices(model, params)
    layer_indices = {i for layer in kfac.layers for i in (layer.weight_index, layer.bias_index)}
    assert layer_indices - {None} == owned
    assert all(isinstance(block, KroneckerBlock) for block in kfac.blocks[:-1])
    assert isinstance(kfac.blocks[-1], DiagonalBlock)
    assert kfac.blocks[-1].shape[0] == len(uncovered) > 0
    assert sorted(kfac.permutation.tolist()) == list(range(kfac.shape[0]))


def test_diagonal_block_is_the_exact_ggn_diagonal_and_decoupled(diagonal_kfac):
    _, kfac, ggn, uncovered = diagonal_kfac
    dense = kfac.to_dense()
    assert_close(dense[uncovered][:, uncovered], torch.diag(ggn.diagonal()[uncovered]))
    covered = torch.ones(dense.shape[0], dtype=torch.bool)
    covered[uncovered] = False
    assert dense[uncovered][:, covered].abs().max() == 0


def test_rules_on_diagonal_blocks_equal_dense_linear_algebra(diagonal_kfac):
    _, kfac, _, _ = diagonal_kfac
    dense = kfac.to_dense()
    eye = torch.eye(dense.shape[0], dtype=F64)
    damped = kfac + DAMPING * cola.ops.I_like(kfac)
    assert_close(damped.to_dense(), dense + DAMPING * eye)
    assert_close(cola.linalg.inv(damped).to_dense(), torch.linalg.inv(dense + DAMPING * eye))
    assert_close(cola.linalg.logdet(damped), torch.logdet(dense + DAMPING * eye))
    assert_close(cola.linalg.diag(kfac), dense.diagonal())
    assert_close(cola.linalg.trace(kfac), dense.trace())
    values = torch.linalg.eigvalsh(dense)
    assert_close(torch.sort(kfac.eigenvalues()).values, values)
    root = cola.linalg.sqrt(damped).to_dense()
    assert_close(root @ root, dense + DAMPING * eye)


def test_heuristic_damping_damps_a_diagonal_block_exactly(diagonal_kfac):
    _, kfac, _, uncovered = diagonal_kfac
    damped = kfac.damped(DAMPING, mode="heuristic")
    assert isinstance(damped.blocks[-1], DiagonalBlock)
    expected = kfac.to_dense()[uncovered][:, uncovered] + DAMPING * torch.eye(
        len(uncovered), dtype=F64
    )
    assert_close(damped.to_dense()[uncovered][:, uncovered], expected)


@pytest.fixture(scope="module")
def tied_gpt():
    """Return a tiny tied GPT and the positions of its uncovered entries."""
    problem = build("gpt-sdpa-tied")
    model, _, params, _ = problem
    return problem, entry_positions(params, uncovered_indices(model, params))


@pytest.mark.parametrize("fisher_type", ["mc", "empirical"])
def test_diagonal_block_matches_the_fisher_type(tied_gpt, fisher_type):
    problem, uncovered = tied_gpt
    options = {"mc_samples": 2, "seed": 5} if fisher_type == "mc" else {}
    kfac = cc.KFAC(*problem, fisher_type=fisher_type, uncovered="diagonal", **options)
    if fisher_type == "empirical":
        expected = ref.dense_empirical_fisher(*problem).diagonal()[uncovered]
    else:  # the dense MC Fisher of the uncovered parameters, same seed and samples
        model, loss, params, data = problem
        subset = [p for i, p in enumerate(params) if i in uncovered_indices(model, params)]
        expected = cc.FisherMC(model, loss, subset, data, **options).to_dense().diagonal()
    assert_close(kfac.to_dense().diagonal()[uncovered], expected)


def test_ekfac_keeps_the_exact_diagonal_block(tied_gpt):
    problem, uncovered = tied_gpt
    ekfac = cc.EKFAC(*problem, uncovered=Uncovered.DIAGONAL)
    assert isinstance(ekfac.blocks[-1], DiagonalBlock)
    dense = ekfac.to_dense()
    ggn_diagonal = cc.DiagonalCurvature(*problem).diagonal()
    assert_close(dense.diagonal()[uncovered], ggn_diagonal[uncovered])
    eye = torch.eye(dense.shape[0], dtype=F64)
    damped = ekfac + DAMPING * cola.ops.I_like(ekfac)
    assert_close(cola.linalg.inv(damped).to_dense(), torch.linalg.inv(dense + DAMPING * eye))
    assert_close(cola.linalg.logdet(damped), torch.logdet(dense + DAMPING * eye))


def test_dense_block_too_large_is_refused_before_anything_is_built(tied_gpt, monkeypatch):
    problem, uncovered = tied_gpt

    def no_statistics(*args, **kwargs):
        raise AssertionError("the Kronecker factors were built before the size check")

    monkeypatch.setattr(kfac_module, "kronecker_factors", no_statistics)
    monkeypatch.setattr(kfac_module, "DENSE_BLOCK_LIMIT_BYTES", len(uncovered) ** 2 * 8 - 1)
    with pytest.raises(ValueError, match="uncovered='diagonal'"):
        cc.KFAC(*problem, uncovered="dense")


def test_dense_block_at_the_limit_is_built(tied_gpt, monkeypatch):
    problem, uncovered = tied_gpt
    monkeypatch.setattr(kfac_module, "DENSE_BLOCK_LIMIT_BYTES", len(uncovered) ** 2 * 8)
    kfac = cc.KFAC(*problem, uncovered="dense")
    model, loss, params, data = problem
    subset = [p for i, p in enumerate(params) if i in uncovered_indices(model, params)]
    expected = cc.GGN(model, loss, subset, data).to_dense()
    assert_close(kfac.to_dense()[uncovered][:, uncovered], expected)


def test_uncovered_choices_are_named_in_the_errors(tied_gpt):
    problem, _ = tied_gpt
    with pytest.raises(ValueError, match="uncovered='diagonal'.*uncovered='dense'"):
        cc.KFAC(*problem)
    with pytest.raises(ValueError, match="'error', 'diagonal', 'dense'"):
        cc.KFAC(*problem, uncovered="zero")
    with pytest.raises(ValueError, match="forward-only"):
        cc.KFAC(*problem, fisher_type="forward-only", uncovered="diagonal")


# --- nn.Embedding as a Kronecker layer: (token counts / N T) ⊗ G on the transposed weight ---


class EmbeddingRegressor(nn.Module):
    """Tokens → ``nn.Embedding`` (padding index 0) → an activation → ``nn.Linear``."""

    def __init__(self, activation):
        super().__init__()
        self.embedding = nn.Embedding(6, 3, padding_idx=0)
        self.activation = activation
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        return self.head(self.activation(self.embedding(tokens)))


def embedding_problem(activation, loss_func, shape, targets):
    """Return the problem on tokens ``1, …, 4``; the first is the padding token 0 when
    there are several (it gets no gradient) and token 5 never appears (zero rows)."""
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = EmbeddingRegressor(activation).to(F64).eval()
        tokens = torch.randint(1, 5, shape)
        if tokens.numel() > 1:
            tokens.view(-1)[0] = 0
        y = targets(shape)
    data = list(zip(tokens.split(2), y.split(2), strict=True))
    return model, loss_func, list(model.parameters()), data


def layer_entries(params, layer):
    """Return the flat entries of a layer's weight and bias in the user's order."""
    return entry_positions(params, {layer.weight_index, layer.bias_index} - {None})


def assert_layer_blocks_equal(kfac, params, dense):
    """Every Kronecker layer's block of ``kfac`` equals that block of ``dense``."""
    kfac_dense = kfac.to_dense()
    for layer in kfac.layers:
        entries = layer_entries(params, layer)
        assert_close(kfac_dense[entries][:, entries], dense[entries][:, entries])


@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_embedding_kfac_is_exact_for_a_linear_model_with_mse(operator_type):
    """Embedding then Linear with MSE per position: expand KFAC (and so EKFAC) equals the
    GGN's blocks, with repeated tokens in an example, a padding token and an unseen one."""
    problem = embedding_problem(
        nn.Identity(),
        nn.MSELoss(reduction="sum"),
        (5, 3),
        lambda shape: torch.randn(*shape, 2, dtype=F64),
    )
    _, _, params, data = problem
    assert any(len(set(x.tolist())) < len(x) for tokens, _ in data for x in tokens)
    kfac = operator_type(*problem)
    assert [layer.kind for layer in kfac.layers] == ["embedding", "linear"]
    if operator_type is cc.KFAC:
        assert kfac.blocks[0].input_factor.shape == (6,)  # a diagonal, never 6 × 6
    else:
        assert kfac.blocks[0].q_in is None  # the identity basis, never 6 × 6
    ggn = ref.dense_ggn(*problem)
    assert_layer_blocks_equal(kfac, params, ggn)
    never_seen = [5 * 3 + j for j in range(3)] + [j for j in range(3)]  # rows 5 and 0 of W
    assert kfac.to_dense()[never_seen].abs().max() == 0
    assert ggn[never_seen].abs().max() == 0


@pytest.fixture(scope="module")
def single_token_problem():
    """Embedding, tanh, Linear, CE on one example with one token: KFAC is exact."""
    return embedding_problem(
        torch.tanh, nn.CrossEntropyLoss(), (1,), lambda shape: torch.randint(0, 2, shape)
    )


@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_embedding_block_is_exact_on_one_example_and_position(single_token_problem, operator_type):
    problem = single_token_problem
    operator = operator_type(*problem)
    assert_layer_blocks_equal(operator, problem[2], ref.dense_ggn(*problem))


def test_rules_on_a_diagonal_input_factor_equal_dense_linear_algebra():
    problem = embedding_problem(
        torch.tanh,
        nn.MSELoss(),
        (4, 3),
        lambda shape: torch.randn(*shape, 2, dtype=F64),
    )
    kfac = cc.KFAC(*problem)
    for operator in (kfac, cc.EKFAC(*problem), kfac.damped(DAMPING, mode="heuristic")):
        dense = operator.to_dense()
        eye = torch.eye(dense.shape[0], dtype=F64)
        damped = operator + DAMPING * cola.ops.I_like(operator)
        assert_close(cola.linalg.inv(damped).to_dense(), torch.linalg.inv(dense + DAMPING * eye))
        assert_close(cola.linalg.logdet(damped), torch.logdet(dense + DAMPING * eye))
        assert_close(cola.linalg.diag(operator), dense.diagonal())
        assert_close(cola.linalg.trace(operator), dense.trace())
        values, vectors = cola.linalg.eig(operator, dense.shape[0], which="LA")
        V = vectors.to_dense()
        assert_close(dense @ V, V * values)
        root = cola.linalg.sqrt(damped).to_dense()
        assert_close(root @ root, dense + DAMPING * eye)


def test_embedding_reduce_factor_is_the_diagonal_of_the_averaged_one_hot_moment():
    problem = embedding_problem(
        torch.tanh, nn.MSELoss(), (4, 3), lambda shape: torch.randn(*shape, 2, dtype=F64)
    )
    kfac = cc.KFAC(*problem, kfac_approx="reduce")
    tokens = torch.cat([x for x, _ in problem[3]])
    one_hot = nn.functional.one_hot(tokens, 6).to(F64) * (tokens != 0)[..., None]
    averaged = one_hot.mean(1)
    expected = (averaged.T @ averaged).diagonal() / tokens.shape[0]
    assert_close(kfac.blocks[0].input_factor, expected)


# --- weights called functionally: nn.MultiheadAttention's in_proj_weight and out_proj ---


#: Parameter names of the SDPA GPT's attention and of its nn.MultiheadAttention twin.
SDPA_TO_MHA = {
    "attn.c_attn.weight": "attn.mha.in_proj_weight",
    "attn.c_attn.bias": "attn.mha.in_proj_bias",
    "attn.c_proj.weight": "attn.mha.out_proj.weight",
    "attn.c_proj.bias": "attn.mha.out_proj.bias",
}


def mha_name(sdpa_name):
    """Return the twin's name of an SDPA GPT parameter."""
    for old, new in SDPA_TO_MHA.items():
        sdpa_name = sdpa_name.replace(old, new)
    return sdpa_name


def mha_twin(sdpa_model, **options):
    """Return a GPT with nn.MultiheadAttention computing the same function as an SDPA GPT."""
    twin = tiny_gpt(attention="mha", tie_weights=False, **options)
    twin.load_state_dict({mha_name(n): v for n, v in sdpa_model.state_dict().items()})
    return twin


def test_multihead_attention_is_covered_and_exact_on_one_example_and_position():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = tiny_gpt(attention="mha", tie_weights=False)
        X, y = torch.randint(0, 7, (1, 1)), torch.randint(0, 7, (1, 1))
    params = list(model.parameters())
    problem = (model, nn.CrossEntropyLoss(), params, [(X, y)])
    kfac = cc.KFAC(*problem, uncovered="diagonal")
    names = {id(p): n for n, p in model.named_parameters()}
    covered = {names[id(params[i])] for layer in kfac.layers for i in (layer.weight_index,)}
    assert {"blocks.0.attn.mha.in_proj_weight", "blocks.0.attn.mha.out_proj.weight"} <= covered
    owned = {i for layer in kfac.layers for i in (layer.weight_index, layer.bias_index)}
    assert owned - {None} == set(range(len(params))) - uncovered_indices(model, params)
    assert_layer_blocks_equal(kfac, params, ref.dense_ggn(*problem))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("operator", ["kfac-reduce", "ekfac"])
def test_multihead_attention_rows_are_grouped_by_example(batch_first, operator):
    """MHA's projections see rows ``t N + n``; KFAC-reduce and EKFAC group them by example
    as they group the SDPA twin's ``(N, T, ·)`` rows: the same function, the same blocks."""
    sdpa, loss, sdpa_params, data = build("gpt-sdpa-untied")
    mha = mha_twin(sdpa, batch_first=batch_first, need_weights=not batch_first)
    mha_params = list(mha.parameters())
    options = {"uncovered": "diagonal"}
    if operator == "kfac-reduce":
        build_operator, options["kfac_approx"] = cc.KFAC, "reduce"
    else:
        build_operator = cc.EKFAC
    expected = build_operator(sdpa, loss, sdpa_params, data, **options)
    actual = build_operator(mha, loss, mha_params, data, **options)
    assert len(actual.layers) == len(expected.layers)
    sdpa_dense, mha_dense = expected.to_dense(), actual.to_dense()
    mha_names = {n: i for i, (n, _) in enumerate(mha.named_parameters())}
    for i, (name, _) in enumerate(sdpa.named_parameters()):
        theirs = entry_positions(mha_params, {mha_names[mha_name(name)]})
        ours = entry_positions(sdpa_params, {i})
        assert_close(mha_dense[theirs][:, theirs], sdpa_dense[ours][:, ours])


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, 2, padding="same", dilation=2),  # asymmetric 'same' padding
        lambda: nn.Conv2d(2, 3, 3, padding="valid", stride=2),
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),  # padded before the call
        lambda: nn.Conv2d(2, 3, (2, 3), padding=(1, 0), stride=(2, 1), dilation=(1, 2)),
    ],
    ids=["same-dilated", "valid-strided", "reflect", "rectangular"],
)
def test_recorded_conv_patches_reproduce_the_convolution(conv):
    """KFAC's patches of a recorded conv2d call, times the weight, give the call's output."""
    from cola_curvature.backends.torch.call_signals import _conv_patches
    from cola_curvature.backends.torch.layer_calls import recorded_calls

    with torch.random.fork_rng():
        torch.manual_seed(5)
        conv = conv().to(F64)
        x = torch.randn(2, 2, 5, 6, dtype=F64)
    with recorded_calls({id(conv.weight)}) as calls:
        conv(x)
    (call,) = calls
    patches = _conv_patches(call)  # (N, T, in)
    weight = conv.weight.detach().reshape(3, -1)
    expected = call.output.detach().flatten(2).transpose(1, 2) - conv.bias.detach()
    assert_close(patches @ weight.T, expected)
    augmented = _conv_patches(call, ones=True)  # (N, T, in + 1), the bias's ones written in
    weight_and_bias = torch.cat([weight, conv.bias.detach()[:, None]], dim=1)
    assert torch.equal(augmented[..., :-1], patches)
    assert_close(augmented @ weight_and_bias.T, call.output.detach().flatten(2).transpose(1, 2))


class HandTiedHead(nn.Module):
    """An embedding whose weight is also the output layer, written ``h @ Wᵀ`` by hand."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)

    def forward(self, tokens):
        return torch.tanh(self.hidden(self.embedding(tokens))) @ self.embedding.weight.T


def test_a_weight_also_used_outside_its_call_is_left_uncovered():
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = HandTiedHead().to(F64).eval()
        X, y = torch.randint(0, 5, (4,)), torch.randint(0, 5, (4,))
    params = list(model.parameters())
    problem = (model, nn.CrossEntropyLoss(), params, [(X, y)])
    with pytest.raises(ValueError, match=r"embedding\.weight.*also used outside its call"):
        cc.KFAC(*problem)
    kfac = cc.KFAC(*problem, uncovered="diagonal")
    assert [layer.name for layer in kfac.layers] == ["hidden"]
    uncovered = entry_positions(params, {0})
    ggn_diagonal = ref.dense_ggn(*problem).diagonal()
    assert_close(kfac.to_dense().diagonal()[uncovered], ggn_diagonal[uncovered])


def test_float32_layers_are_found_despite_batch_dependent_rounding():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
        X, y = torch.randn(16, 300), torch.randint(0, 10, (16,))
    kfac = cc.KFAC(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    assert [layer.name for layer in kfac.layers] == ["0", "2"]


@pytest.mark.usefixtures("jax_float64")
def test_jax_uncovered_leaves_get_the_exact_diagonal():
    import jax
    import jax.numpy as jnp

    from tests import jax_reference

    def normal(key, *shape):
        return jax.random.normal(jax.random.key(key), shape, dtype=jnp.float64)

    params = {"w": normal(0, 3, 2), "b": normal(1, 2), "scale": jnp.array([1.5, -0.5])}
    X, y = normal(2, 6, 3), jax.random.randint(jax.random.key(3), (6,), 0, 2)

    def model_fn(p, x):
        return (jnp.dot(x, p["w"]) + p["b"]) * p["scale"]

    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss = cc.losses.CrossEntropy()
    operator = cc.EKFAC(
        model_fn, loss, params, data, uncovered="diagonal", check_deterministic=False
    )
    assert isinstance(operator.blocks[-1], DiagonalBlock)
    built = torch.as_tensor(np.asarray(jax.jit(lambda: operator @ jnp.eye(operator.shape[0]))()))
    dense_ggn = jax.jit(jax_reference.dense_ggn, static_argnums=(0, 1, 2))
    ggn = torch.as_tensor(np.asarray(dense_ggn(model_fn, "ce", "mean", params, data)))
    scale = slice(2, 4)  # flat order: b (2), scale (2), w (6)
    assert_close(built[scale, scale], torch.diag(ggn.diagonal()[scale]))
    assert built[scale, :2].abs().max() == built[scale, 4:].abs().max() == 0
