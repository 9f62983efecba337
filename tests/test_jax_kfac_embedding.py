"""JAX KFAC and EKFAC cover embedding lookups: a ``gather`` of whole rows of a params leaf.

The block is ``G ⊗ diag(token counts / (N T))`` on ``vec(Wᵀ)``, as torch's for
``nn.Embedding``: checked against the dense GGN (``jax.jacfwd``) where KFAC is exact
(an embedding then a dense layer, MSE per position, as in ``tests/test_kfac_coverage.py``),
and against torch's KFAC on the GPT twin with the same weights.
"""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cola_curvature as cc
from cola_curvature.backends.jax.backend import JaxBackend
from cola_curvature.backends.jax.kfac import SignalOptions, layer_signals
from cola_curvature.options import FisherType
from tests import jax_reference
from tests._tols import EXACT_RTOL
from tests.jax_reference import relative_error
from tests.test_models_jax import FAST, operator_arguments, torch_gpt, vectors

pytestmark = pytest.mark.usefixtures("jax_float64")

VOCAB, WIDTH, OUT = 6, 3, 2
#: Ways users write ``W[x]``; each lowers to one row ``gather`` of the table.
LOOKUPS = {
    "index": lambda table, x: table[x],
    "take": lambda table, x: jnp.take(table, x, axis=0),
    "at-get": lambda table, x: table.at[x].get(),
    "flax": lambda table, x: linen.Embed(VOCAB, WIDTH).apply({"params": {"embedding": table}}, x),
}


def normal(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, dtype=jnp.float64)


def embedding_regression(lookup):
    """Return ``model_fn`` (tokens → a ``VOCAB × WIDTH`` table → a dense layer) and params."""

    def model_fn(p, x):
        return lookup(p["table"], x) @ p["w"] + p["b"]

    params = {"table": normal(0, VOCAB, WIDTH), "w": normal(1, WIDTH, OUT), "b": normal(2, OUT)}
    return model_fn, params


def token_batches(shape):
    """Tokens ``0 … 4`` (``VOCAB - 1`` never appears), normal targets, uneven batches."""
    tokens = jax.random.randint(jax.random.key(3), shape, 0, VOCAB - 1)
    targets = normal(4, *shape, OUT)
    return [(tokens[:2], targets[:2]), (tokens[2:4], targets[2:4]), (tokens[4:], targets[4:])]


def flat_entries(params, indices):
    """Return the flat (``ravel_pytree``) positions of the leaves ``indices``."""
    offsets = np.cumsum([0] + [leaf.size for leaf in jax.tree_util.tree_leaves(params)])
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in sorted(indices)])


def dense(operator):
    """``operator @ I``, traced as one program."""
    return np.asarray(jax.jit(lambda: operator @ jnp.eye(operator.shape[0]))())


@pytest.fixture(scope="module")
def take_regression(jax_float64):
    """``(model_fn, loss, params, data, dense GGN)`` of the ``take`` model, shared by KFAC and
    EKFAC (one ``model_fn`` and loss object: they share the compiled statistics)."""
    model_fn, params = embedding_regression(LOOKUPS["take"])
    data = token_batches((5, 3))
    ggn = np.asarray(jax_reference.dense_ggn(model_fn, "mse", "sum", params, data))
    return model_fn, cc.losses.MSE(reduction="sum"), params, data, ggn


@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_embedding_kfac_is_exact_for_a_linear_model_with_mse(take_regression, operator_type):
    """Embedding then dense with MSE per position: expand KFAC (and so EKFAC) equals the
    GGN's blocks, with tokens repeated within an example and one never seen."""
    model_fn, loss, params, data, ggn = take_regression
    assert any(len(set(x.tolist())) < len(x) for tokens, _ in data for x in tokens)
    operator = operator_type(model_fn, loss, params, data, **FAST)
    assert [layer.kind for layer in operator.layers] == ["embedding", "dense"]
    if operator_type is cc.KFAC:
        assert operator.blocks[0].input_factor.shape == (VOCAB,)  # a diagonal, never V × V
    else:
        assert operator.blocks[0].q_in is None  # the identity basis, never V × V
    built = dense(operator)
    for layer in operator.layers:
        positions = flat_entries(params, {layer.weight_index, layer.bias_index} - {None})
        entries = np.ix_(positions, positions)
        assert relative_error(built[entries], ggn[entries]) < EXACT_RTOL, layer.kind
    table = flat_entries(params, {operator.layers[0].weight_index})
    never_seen = table.reshape(VOCAB, WIDTH)[VOCAB - 1]
    assert np.abs(ggn[never_seen]).max() == 0
    assert np.abs(built[never_seen]).max() == 0


@pytest.mark.parametrize("shape", [(4, 3), (4,)], ids=["positions", "one-token"])
@pytest.mark.parametrize("lookup", LOOKUPS.values(), ids=LOOKUPS.keys())
def test_row_gathers_of_a_leaf_are_embedding_layers_on_the_transposed_table(lookup, shape):
    model_fn, params = embedding_regression(lookup)
    backend = JaxBackend(model_fn, cc.losses.MSE(), params)
    layers = backend.kronecker_layers(token_batches(shape))
    assert [(layer.kind, layer.name) for layer in layers] == [
        ("embedding", "['table']"),
        ("dense", "['w']"),
    ]
    embedding = layers[0]
    assert (embedding.out_features, embedding.in_features) == (WIDTH, VOCAB)
    rows = np.arange(VOCAB * WIDTH).reshape(VOCAB, WIDTH)
    assert np.array_equal(embedding.weight_positions, rows.T)


def test_a_transposed_table_is_found_with_its_own_layout():
    """``W[:, x]ᵀ`` on a ``WIDTH × VOCAB`` leaf reads the rows of ``Wᵀ``: same layer, other
    positions (entry ``(o, i)`` of the block is ``W[o, i]``)."""

    def model_fn(p, x):
        return p["table"].T[x] @ p["w"]

    params = {"table": normal(0, WIDTH, VOCAB), "w": normal(1, WIDTH, OUT)}
    layers = JaxBackend(model_fn, cc.losses.MSE(), params).kronecker_layers(token_batches((4, 3)))
    assert [layer.kind for layer in layers] == ["embedding", "dense"]
    columns = np.arange(WIDTH * VOCAB).reshape(WIDTH, VOCAB)
    assert np.array_equal(layers[0].weight_positions, columns)


@pytest.mark.parametrize(
    "body",
    [
        lambda p, x: p["table"][:, x % WIDTH].sum(0)[..., None] * p["w"][0],  # columns
        lambda p, x: jnp.tanh(p["table"][x] @ p["w"]) @ jnp.tanh(p["table"]).T,  # other op
        # a position table all examples share: its lookups are not one per example
        lambda p, x: x[..., None] * (p["table"][jnp.arange(x.shape[1])] @ p["w"]),
        # shared positions next to a per-example lookup: the table's uses are incomplete
        lambda p, x: (p["table"][x] + p["table"][jnp.arange(x.shape[1])]) @ p["w"],
    ],
    ids=["column-gather", "other-op", "shared-positions", "shared-and-per-example"],
)
def test_other_uses_of_a_table_leave_it_uncovered(body):
    params = {"table": normal(0, VOCAB, WIDTH), "w": normal(1, WIDTH, WIDTH)}
    layers = JaxBackend(body, cc.losses.MSE(), params).kronecker_layers(token_batches((4, 3)))
    assert "['table']" not in [layer.name for layer in layers]


@pytest.mark.parametrize(
    "lookup",
    [
        lambda table, x: jnp.take(table, x, axis=0, fill_value=0.0),  # out of range: no row
        lambda table, x: jnp.take(table, x, axis=0, mode="clip"),  # out of range: clamped
    ],
    ids=["fill", "clip"],
)
def test_token_inputs_give_the_gathers_own_gradient_for_out_of_range_indices(lookup):
    """``Σ_{n,t} w_{n,t} e_{x_{n,t}} g_{n,t}ᵀ`` from the captured tokens is ``∇_W`` of the loss."""
    model_fn, params = embedding_regression(lookup)
    loss = cc.losses.MSE(reduction="sum")
    tokens = jnp.array([[1, -1, 9], [-7, 1, 4]])
    targets = normal(5, 2, 3, OUT)
    backend = JaxBackend(model_fn, loss, params)
    layers = backend.kronecker_layers([(tokens, targets)])
    options = SignalOptions(
        model_fn, loss, tuple(backend.layout.names), tuple(layers), 2, FisherType.EMPIRICAL, 1
    )
    signals = layer_signals(options, params, tokens, targets, None)
    inputs, grads = signals.inputs["['table']"], signals.output_grads["['table']"][0]
    weighted = (grads * inputs.weights[..., None]).reshape(-1, WIDTH)
    gradient = inputs.segment_sum(weighted, inputs.indices.reshape(-1), VOCAB)
    expected = jax.grad(lambda p: loss.sum_value(model_fn(p, tokens), targets))(params)
    assert relative_error(gradient, expected["table"]) < EXACT_RTOL


@pytest.fixture(scope="module")
def untied_gpt(jax_float64):
    """Operator arguments of the untied GPT, shared by KFAC and EKFAC (one ``model_fn``)."""
    return operator_arguments(torch_gpt(tie_weights=False))


@pytest.mark.parametrize("operator_type", [cc.KFAC, cc.EKFAC])
def test_jax_and_torch_agree_on_the_untied_gpt_with_its_token_embedding(untied_gpt, operator_type):
    torch_args, jax_args, perm = untied_gpt
    V, V_jax = vectors(perm)
    options = {"uncovered": "diagonal", **FAST}
    torch_operator = operator_type(*torch_args, **options)
    jax_operator = operator_type(*jax_args, **options)
    assert [layer.kind for layer in jax_operator.layers].count("embedding") == 1
    assert "['wte.weight']" in [layer.name for layer in jax_operator.layers]
    assert len(jax_operator.layers) == len(torch_operator.layers)
    expected = (torch_operator @ V).numpy()[perm]
    assert relative_error(jax_operator @ V_jax, expected) < EXACT_RTOL


@pytest.mark.parametrize(
    "body",
    [
        lambda p, x: (p["table"][x] + p["table"][x + 1]) @ p["w"],  # looked up twice
        lambda p, x: jnp.tanh(p["table"][x] @ p["w"]) @ p["table"].T,  # tied head
    ],
    ids=["two-lookups", "tied-head"],
)
def test_a_table_used_by_two_layers_is_one_shared_layer(body):
    params = {"table": normal(0, VOCAB, WIDTH), "w": normal(1, WIDTH, WIDTH)}
    layers = JaxBackend(body, cc.losses.MSE(), params).kronecker_layers(token_batches((4, 3)))
    (shared,) = [layer for layer in layers if layer.name == "['table']"]
    assert shared.kind == "shared"
    assert [use.name for use in shared.uses] == ["['table']#0", "['table']#1"]
