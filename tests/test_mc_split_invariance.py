"""Monte-Carlo curvature does not depend on how the same examples are split into batches.

Every sampled target of example ``n`` is drawn from a stream keyed by the seed and ``n``'s
global position in the data, so ``FisherMC``, KFAC/EKFAC with ``fisher_type="mc"`` and the
mc diagonal give the same matrix (to rounding) for one batch, two, or three uneven ones;
the same seed gives the same matrix and another seed another. Torch: an MLP with
cross-entropy (categorical draws), a CNN with MSE (Gaussian draws) and a sequence model
with BCE (Bernoulli draws, several positions per example), and two ``torch.distributed``
ranks; JAX: the MLP and the CNN.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import cola_curvature as cc
from cola_curvature.backends.jax.state import JaxExampleRandom
from cola_curvature.backends.torch.state import TorchExampleRandom

pytestmark = pytest.mark.usefixtures("jax_float64")

F64 = torch.float64
NUM_EXAMPLES = 7
#: Batch sizes of the same 7 examples in the same order: one batch, two, three uneven ones.
SPLITS = {"one": (7,), "two": (4, 3), "three": (3, 3, 1)}
#: The splits compared with one batch; JAX compiles every batch shape, so it skips "two".
COMPARED_SPLITS = {"torch": ("two", "three"), "jax": ("three",)}
#: Sums over examples are only reassociated by another split.
SPLIT_RTOL = 1e-12
#: Two seeds' Monte-Carlo matrices differ by far more than this.
SEED_GAP = 1e-3
OPERATORS = ("fisher", "kfac", "ekfac", "diagonal")
#: ``(backend, problem, mc_samples)``; JAX compiles a program per batch shape and
#: ``mc_samples``, so it runs a subset (the samplers are backend-neutral).
CASES = [
    *[("torch", problem, m) for problem in ("mlp-ce", "cnn-mse", "sequence-bce") for m in (1, 3)],
    ("jax", "mlp-ce", 1),
    ("jax", "cnn-mse", 3),
]


def relative_error(result, reference):
    return float(np.abs(result - reference).max() / np.abs(reference).max())


def split(X, y, sizes):
    bounds = np.cumsum((0,) + sizes)
    return [(X[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---- torch problems ----------------------------------------------------------------------


LAYERS = {
    "mlp-ce": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)),
    "cnn-mse": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)),
    "sequence-bce": lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
}


def torch_problem(name):
    """``(model, loss_func, X, y)`` of a problem, from a private generator."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64)

    with torch.random.fork_rng():  # the layers' default initialisation draws from it
        model = LAYERS[name]()
    if name == "mlp-ce":
        X, y = randn(NUM_EXAMPLES, 3), torch.randint(0, 3, (NUM_EXAMPLES,), generator=generator)
        loss_func = nn.CrossEntropyLoss()
    elif name == "cnn-mse":
        X, y = randn(NUM_EXAMPLES, 2, 4, 4), randn(NUM_EXAMPLES, 2)
        loss_func = nn.MSELoss(reduction="sum")
    else:
        X = randn(NUM_EXAMPLES, 4, 3)
        y = torch.rand(NUM_EXAMPLES, 4, 2, generator=generator, dtype=F64)
        loss_func = nn.BCEWithLogitsLoss()
    model = model.to(F64)
    with torch.no_grad():  # small weights, as in weight() below
        for p in model.parameters():
            p.copy_(0.5 * randn(*p.shape))
    return model, loss_func, X, y


@functools.cache
def torch_result(problem, operator, mc_samples, split_name, seed):
    """The operator's matrix (``FisherMC``: its product with two fixed columns) as NumPy."""
    model, loss_func, X, y = torch_problem(problem)
    data = split(X, y, SPLITS[split_name])
    return torch_matrix(operator, model, loss_func, data, mc_samples=mc_samples, seed=seed)


def torch_matrix(operator, model, loss_func, data, **options):
    """As :func:`torch_result`, on given data and with the operator's keyword options."""
    args = (model, loss_func, list(model.parameters()), data)
    if operator == "fisher":
        fisher = cc.FisherMC(*args, **options)
        V = torch.randn(fisher.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=F64)
        return (fisher @ V).numpy()
    builder = {"kfac": cc.KFAC, "ekfac": cc.EKFAC, "diagonal": cc.DiagonalCurvature}[operator]
    built = builder(*args, fisher_type="mc", **options)
    return (built @ torch.eye(built.shape[0], dtype=F64)).numpy()


# ---- JAX problems ------------------------------------------------------------------------


def normal(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, dtype=jnp.float64)


def weight(key, *shape):
    """Small weights: spread-out predictive distributions, so every draw matters."""
    return 0.5 * normal(key, *shape)


def linear(W, b, x):
    return x @ W.T + b


def conv(W, b, x):
    numbers = ("NCHW", "OIHW", "NCHW")
    out = jax.lax.conv_general_dilated(x, W, (1, 1), "VALID", dimension_numbers=numbers)
    return out + b[:, None, None]


def jax_mlp(p, x):
    return linear(p["w2"], p["b2"], jnp.tanh(linear(p["w1"], p["b1"], x)))


def jax_cnn(p, x):
    h = jnp.tanh(conv(p["w1"], p["b1"], x)).reshape(x.shape[0], -1)
    return linear(p["w2"], p["b2"], h)


@functools.cache
def jax_problem(name):
    """``(model_fn, loss, params, X, y)`` of ``"mlp-ce"`` or ``"cnn-mse"`` (torch's shapes).

    Cached: operators on the same ``model_fn`` and loss object share compiled programs.
    """
    if name == "mlp-ce":
        shapes = {"w1": (4, 3), "b1": (4,), "w2": (3, 4), "b2": (3,)}
        X = normal(4, NUM_EXAMPLES, 3)
        y = jax.random.randint(jax.random.key(5), (NUM_EXAMPLES,), 0, 3)
        model_fn, loss = jax_mlp, cc.losses.CrossEntropy()
    else:
        shapes = {"w1": (3, 2, 3, 3), "b1": (3,), "w2": (2, 12), "b2": (2,)}
        X, y = normal(4, NUM_EXAMPLES, 2, 4, 4), normal(5, NUM_EXAMPLES, 2)
        model_fn, loss = jax_cnn, cc.losses.MSE("sum")
    params = {name: weight(key, *shape) for key, (name, shape) in enumerate(shapes.items())}
    return model_fn, loss, params, X, y


@functools.cache
def jax_result(problem, operator, mc_samples, split_name, seed):
    """As :func:`torch_result`, for the JAX twin of the problem."""
    model_fn, loss, params, X, y = jax_problem(problem)
    args = (model_fn, loss, params, split(X, y, SPLITS[split_name]))
    options = {"mc_samples": mc_samples, "seed": seed, "check_deterministic": False}
    if operator == "fisher":
        fisher = cc.FisherMC(*args, **options)
        return np.asarray(fisher @ normal(6, fisher.shape[0], 2))
    builder = {"kfac": cc.KFAC, "ekfac": cc.EKFAC, "diagonal": cc.DiagonalCurvature}[operator]
    built = builder(*args, fisher_type="mc", **options)
    return np.asarray(built @ jnp.eye(built.shape[0]))


RESULTS = {"torch": torch_result, "jax": jax_result}


# ---- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize(("backend", "problem", "mc_samples"), CASES)
def test_any_split_into_batches_gives_the_same_matrix(backend, problem, operator, mc_samples):
    result = functools.partial(RESULTS[backend], problem, operator, mc_samples)
    reference = result("one", 0)
    for split_name in COMPARED_SPLITS[backend]:
        error = relative_error(result(split_name, 0), reference)
        assert error < SPLIT_RTOL, (split_name, error)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize(("backend", "problem", "mc_samples"), CASES)
def test_the_seed_alone_fixes_the_matrix(backend, problem, mc_samples, operator):
    result = functools.partial(RESULTS[backend], problem, operator, mc_samples)
    reference = result("three", 0)
    # a rebuilt operator on the same seed, uncached: bit-for-bit the same draws
    again = RESULTS[backend].__wrapped__(problem, operator, mc_samples, "three", 0)
    assert np.array_equal(again, reference)
    assert relative_error(result("three", 1), reference) > SEED_GAP


def test_torch_draws_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    torch_result.__wrapped__("mlp-ce", "fisher", 3, "three", 5)
    torch_result.__wrapped__("sequence-bce", "kfac", 3, "three", 5)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("draw", ["uniform", "normal"])
def test_a_batch_draws_the_slice_of_its_examples(draw):
    """The source of a batch from example 2 gives rows 2.. of the source from example 0."""
    shape = (3, NUM_EXAMPLES, 2, 5)
    like = torch.zeros((), dtype=F64)
    whole = getattr(TorchExampleRandom(4, 0), draw)(shape, like)
    part = getattr(TorchExampleRandom(4, 2), draw)((3, 4, 2, 5), like)
    assert torch.equal(part, whole[:, 2:6])
    jax_like = jnp.zeros((), dtype=jnp.float64)
    whole = getattr(JaxExampleRandom.seeded(4, 0), draw)(shape, jax_like)
    part = getattr(JaxExampleRandom.seeded(4, 2), draw)((3, 4, 2, 5), jax_like)
    assert np.array_equal(np.asarray(part), np.asarray(whole[:, 2:6]))


# ---- distributed: a rank numbers its examples after those of the ranks before it ---------

#: The batches of the "three" split each of two gloo ranks holds (uneven shards).
RANK_BATCHES = {0: (0,), 1: (1, 2)}


def test_ranks_continue_the_numbering_of_the_ranks_before_them(tmp_path):
    """Two ranks holding examples 0–2 and 3–6 give what one process gives on all 7."""
    outputs = [tmp_path / f"rank{rank}.npz" for rank in RANK_BATCHES]
    command = [sys.executable, __file__, str(tmp_path / "init")]
    processes = [
        subprocess.Popen(
            [*command, str(rank), str(output)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, output in zip(RANK_BATCHES, outputs, strict=True)
    ]
    for process in processes:
        log = process.communicate(timeout=300)[0]
        assert process.returncode == 0, log
    for output in outputs:
        results = np.load(output)
        for operator in OPERATORS:
            reference = torch_result("mlp-ce", operator, 3, "one", 0)
            assert relative_error(results[operator], reference) < SPLIT_RTOL, operator


def distributed_worker(init_file, rank, output):
    """One rank of the gloo run above: its shard's matrices, summed over both ranks."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(RANK_BATCHES)
    )
    model, loss_func, X, y = torch_problem("mlp-ce")
    batches = split(X, y, SPLITS["three"])
    shard = [batches[i] for i in RANK_BATCHES[rank]]
    options = {"mc_samples": 3, "seed": 0, "distributed": True}
    results = {op: torch_matrix(op, model, loss_func, shard, **options) for op in OPERATORS}
    np.savez(output, **results)
    dist.destroy_process_group()


if __name__ == "__main__":
    distributed_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
