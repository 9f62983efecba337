"""The Laplace evidence against the peer library laplace-torch (``pip install laplace-torch``).

What each side computes, for regression with ``N`` targets of ``C`` outputs, MAP ``θ*``
(``D`` entries), residuals ``r_n = f(x_n) - y_n``, noise ``σ``, prior ``N(0, δ⁻¹ I)``,
temperature ``T`` and ``H`` the GGN of the unit-variance Gaussian NLL ``½ Σ ‖r_n‖²``:

* ours, ``cc.Laplace.log_marginal_likelihood``:
  ``-(Σ‖r‖²/(2σ²) + (NC/2) log(2πσ²)) / T - ½ δ ‖θ*‖² + ½ D log δ - ½ logdet P``,
  ``P = H / (σ² T) + δ I``;
* laplace-torch 0.3, ``BaseLaplace.log_likelihood - ½ (log_det_ratio + scatter)``:
  ``-(½ Σ‖r‖²)/(σ² T) - N C log(σ √(2π)) - ½ (logdet P - D log δ) - ½ δ ‖θ*‖²`` with the
  same ``P`` (``_H_factor = 1/(σ² T)``; the backend's ``H`` is ``0.5 ×`` the GGN of
  ``MSELoss("sum")``, i.e. the same ``H``), prior mean 0.

At ``T = 1`` both are the same number. At ``T ≠ 1`` laplace-torch does not temper the
Gaussian normaliser, so ``ours - theirs = -(1/T - 1) (NC/2) log(2πσ²)`` exactly; the
temperature test checks that identity.

Two differences of laplace-torch 0.3 that the tests work around, not tolerances:

* ``hessian_structure="full"`` with the default Curvlinops backend builds the GGN as
  ``linop @ torch.eye(D)``, and ``torch.eye`` takes the *default* dtype: float32, so a
  float64 model gets a GGN with float32 rounding (relative error ~1e-8, which moves the
  evidence by 1e-6 to 1e-5 relative at σ = 0.2, more than the tolerance here). The tests
  fit with the default dtype set to float64 (restored afterwards), which makes that
  product exact (the first test checks ``H`` against our dense GGN to 1e-10).
* ``hessian_structure="kron"`` (Curvlinops ``KFACLinearOperator``, type-2, expand) gives a
  layer's weight and bias *separate* blocks (``G ⊗ A_ww`` and ``G``), while our
  ``curvature="kfac"`` gives them one block ``G ⊗ Ã`` with the augmented input
  ``ã = [a, 1]``. Both use the same ``G`` and the same (augmented) ``A``, so: on a model
  without biases the two are the same matrix; with biases, our factors rearranged into
  laplace-torch's separate blocks give its evidence; and since laplace-torch's ``P`` is
  exactly the block diagonal (weight/weight, bias/bias) of ours, Fischer's inequality
  ``det P ≤ det P_ww det P_bb`` proves that our KFAC evidence is at least theirs.

Both libraries' factors are sums over examples, so neither depends on the batching; the
tests batch the data differently on the two sides (2 batches here, a loader of 40 there).
"""

import math

import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import KroneckerBlock

laplace = pytest.importorskip(
    "laplace", reason="laplace-torch is not installed (make test installs it with --no-deps)"
)
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

F64 = torch.float64
NUM_POINTS = 60
HYPERPARAMETERS = [(0.5, 0.2), (1.0, 0.3), (3.0, 0.5)]
RTOL = 1e-6


@pytest.fixture(autouse=True)
def restore_global_state():
    """Leave the global torch RNG and default dtype as found (DataLoader draws a seed)."""
    rng, dtype = torch.random.get_rng_state(), torch.get_default_dtype()
    try:
        yield
    finally:
        torch.random.set_rng_state(rng)
        torch.set_default_dtype(dtype)
    assert torch.equal(torch.random.get_rng_state(), rng)


def regression_problem(bias=True):
    """``examples/demo.py`` scaled down: 60 points, MLP 1-16-1 tanh, brief Adam, float64."""
    generator = torch.Generator().manual_seed(0)
    x = 8 * torch.rand(NUM_POINTS, 1, generator=generator, dtype=F64)
    y = torch.sin(x) + 0.3 * torch.randn(NUM_POINTS, 1, generator=generator, dtype=F64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16, bias=bias), nn.Tanh(), nn.Linear(16, 1, bias=bias))
    model = model.to(F64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, x, y


def ours(model, x, y, curvature, delta, sigma, temperature=1.0):
    """Our evidence on two uneven batches."""
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    la = cc.Laplace(
        model,
        nn.MSELoss(),
        list(model.parameters()),
        data,
        curvature=curvature,
        prior_precision=delta,
        sigma_noise=sigma,
        temperature=temperature,
    )
    return la.log_marginal_likelihood().item()


def fit_theirs(model, x, y, structure, temperature=1.0):
    """laplace-torch's posterior over all weights, fitted with a float64 ``torch.eye``."""
    la = laplace.Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure=structure,
        temperature=temperature,
    )
    torch.set_default_dtype(F64)  # laplace-torch builds the full GGN on torch.eye(D)
    try:
        la.fit(DataLoader(TensorDataset(x, y), batch_size=40, shuffle=False))
    finally:
        torch.set_default_dtype(torch.float32)
    return la


def theirs(la, delta, sigma):
    """laplace-torch's evidence at ``(δ, σ)``."""
    as_tensor = lambda value: torch.tensor(value, dtype=F64)  # noqa: E731
    return la.log_marginal_likelihood(as_tensor(delta), as_tensor(sigma)).item()


def test_full_ggn_evidence_matches_laplace_torch():
    model, x, y = regression_problem()
    la = fit_theirs(model, x, y, "full")
    # The curvature itself: laplace-torch's H is ½ × the GGN of MSELoss("sum").
    ggn = cc.GGN(model, nn.MSELoss(reduction="sum"), list(model.parameters()), [(x, y)])
    assert torch.linalg.norm(la.H - 0.5 * ggn.to_dense()) <= 1e-10 * torch.linalg.norm(la.H)
    for delta, sigma in HYPERPARAMETERS:
        expected = theirs(la, delta, sigma)
        actual = ours(model, x, y, "full", delta, sigma)
        assert actual == pytest.approx(expected, rel=RTOL), (delta, sigma)


def test_temperature_differs_by_the_untempered_normaliser():
    model, x, y = regression_problem()
    temperature = 0.5
    la = fit_theirs(model, x, y, "full", temperature=temperature)
    for delta, sigma in HYPERPARAMETERS:
        # laplace-torch keeps -(NC/2) log(2πσ²) untempered; we divide it by T too.
        offset = -(1 / temperature - 1) * 0.5 * NUM_POINTS * math.log(2 * math.pi * sigma**2)
        expected = theirs(la, delta, sigma) + offset
        actual = ours(model, x, y, "full", delta, sigma, temperature)
        assert actual == pytest.approx(expected, rel=RTOL), (delta, sigma)


def test_kfac_without_biases_matches_laplace_torch_kron():
    model, x, y = regression_problem(bias=False)
    la = fit_theirs(model, x, y, "kron")
    for delta, sigma in HYPERPARAMETERS:
        expected = theirs(la, delta, sigma)
        actual = ours(model, x, y, "kfac", delta, sigma)
        assert actual == pytest.approx(expected, rel=RTOL), (delta, sigma)


def separate_weight_and_bias(kfac):
    """Our KFAC's factors as laplace-torch's blocks: ``G ⊗ A_ww`` and ``G ⊗ A_bb`` per layer."""
    offsets = [0]
    for size in kfac._backend.layout.sizes:
        offsets.append(offsets[-1] + size)
    blocks, positions = [], []
    for layer, block in zip(kfac.layers, kfac.blocks, strict=True):
        G, A = block.output_factor, block.input_factor
        assert layer.weight_index is not None and layer.bias_index is not None
        width = layer.weight_columns
        blocks += [KroneckerBlock(G, A[:width, :width]), KroneckerBlock(G, A[width:, width:])]
        rows = torch.arange(layer.out_features)
        grid = torch.arange(layer.out_features * width)
        positions += [offsets[layer.weight_index] + grid, offsets[layer.bias_index] + rows]
    return KroneckerFactored(blocks, torch.cat(positions))


def test_kfac_with_biases_against_laplace_torch_kron():
    model, x, y = regression_problem()
    params = list(model.parameters())
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    kfac = cc.KFAC(model, nn.MSELoss(reduction="sum"), params, data)
    # The unit-variance NLL is ½ MSELoss("sum"), as cc.Laplace expects of a user operator.
    separate = separate_weight_and_bias(kfac).scaled(0.5)
    la = fit_theirs(model, x, y, "kron")
    for delta, sigma in HYPERPARAMETERS:
        expected = theirs(la, delta, sigma)
        rearranged = cc.Laplace(
            model,
            nn.MSELoss(),
            params,
            data,
            curvature=separate,
            prior_precision=delta,
            sigma_noise=sigma,
        ).log_marginal_likelihood()
        assert rearranged.item() == pytest.approx(expected, rel=RTOL), (delta, sigma)
        # Fischer's inequality: our shared weight-bias blocks can only raise the evidence.
        joint = ours(model, x, y, "kfac", delta, sigma)
        assert joint >= expected - RTOL * abs(expected), (delta, sigma)
