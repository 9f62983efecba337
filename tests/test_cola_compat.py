"""Pins the CoLA 0.0.7 behaviour cola_curvature relies on, so an upgrade that changes it fails.

Most tests pin plain CoLA; they run after ``import cola_curvature`` (which applies the shims in
``_compat`` and registers ``dispatch_rules``), so every operator here is one our rules leave
alone: custom subclasses, ``Dense``, ``Identity``. A few tests pin CoLA bugs we work around;
their names say so.
"""

import importlib.metadata
import re

import cola
import numpy as np
import pytest
import torch
from cola.ops import BlockDiag, Dense, Identity, Kronecker, LinearOperator, Product, ScalarMul, Sum

import cola_curvature  # noqa: F401  (applies the shims under test)
from cola_curvature import _compat

F64 = torch.float64


class Doubler(LinearOperator):
    """A custom operator the way ours are written: ``super().__init__`` plus ``_matmat``."""

    def __init__(self, n, annotations=frozenset()):
        super().__init__(F64, (n, n), annotations=set(annotations))

    def _matmat(self, X):
        return 2 * X


def dense(seed, n, m=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, m or n, dtype=F64, generator=generator)


def spd(seed, n):
    M = dense(seed, n)
    return M @ M.T + n * torch.eye(n, dtype=F64)


# --- versions and the environment check -------------------------------------------------


def test_pinned_versions():
    assert importlib.metadata.version("cola-ml") == "0.0.7"
    assert cola.__version__ == "0.0.7"
    major, minor = (int(p) for p in importlib.metadata.version("beartype").split(".")[:2])
    assert (major, minor) < (0, 23)
    assert importlib.metadata.version("cola-plum-dispatch")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("plum-dispatch")


@pytest.mark.parametrize(
    ("installed", "fix"),
    [
        ({"plum-dispatch": "2.5.0"}, "pip uninstall -y plum-dispatch"),
        ({"cola-plum-dispatch": None}, "pip install --force-reinstall cola-plum-dispatch"),
        ({"beartype": "0.23.0"}, "beartype>=0.18.5,<0.23"),
        ({"beartype": "1.0"}, "beartype>=0.18.5,<0.23"),
        ({"cola-ml": "0.0.8"}, "pip install cola-ml==0.0.7"),
        ({"cola-ml": None}, "it is not installed"),
    ],
)
def test_environment_check_names_the_fix(monkeypatch, installed, fix):
    real = _compat._installed
    monkeypatch.setattr(
        _compat, "_installed", lambda name: installed[name] if name in installed else real(name)
    )
    with pytest.raises(ImportError, match=re.escape(fix)):
        _compat.check_environment()


def test_environment_check_passes_here():
    _compat.check_environment()


# --- annotations --------------------------------------------------------------------------


def test_annotations():
    plain = Doubler(3)
    A = cola.PSD(plain)
    assert A is not plain  # cola.PSD wraps a copy and leaves its argument as it was
    assert not plain.isa(cola.PSD)
    assert A.isa(cola.PSD)
    assert A.isa(cola.SelfAdjoint)  # PSD implies SelfAdjoint ...
    assert issubclass(cola.PSD, cola.SelfAdjoint)
    S = cola.SelfAdjoint(Doubler(3))
    assert S.isa(cola.SelfAdjoint)
    assert not S.isa(cola.PSD)  # ... but not the other way round
    assert cola.PSD is cola.annotations.PSD
    assert cola.SelfAdjoint is cola.annotations.SelfAdjoint


def test_annotations_passed_to_the_constructor():
    # our operators pass annotations={PSD} (or {SelfAdjoint}) to LinearOperator.__init__
    A = Doubler(3, {cola.PSD})
    assert A.annotations == {cola.PSD}
    assert A.isa(cola.SelfAdjoint)
    assert A.T is A  # a self-adjoint operator is its own transpose and adjoint
    assert A.H is A
    assert Doubler(3).annotations == set()


def test_annotations_of_composites():
    P, Q = Doubler(3, {cola.PSD}), Doubler(3, {cola.PSD})
    eye = cola.ops.I_like(P)
    assert eye.isa(cola.PSD)
    assert (P + Q).isa(cola.PSD)
    assert (2.0 * P).isa(cola.PSD)
    assert (P + 0.5 * eye).isa(cola.PSD)
    assert BlockDiag(P, Q).isa(cola.PSD)
    assert Kronecker(P, Q).isa(cola.PSD)
    assert not (P @ Q).isa(cola.SelfAdjoint)  # products are not inferred to be symmetric
    assert not (P + Doubler(3)).isa(cola.SelfAdjoint)  # a sum keeps only shared annotations


def test_known_bug_scalar_multiples_keep_annotations_whatever_the_sign():
    # CoLA's get_annotations(Product) returns the annotations of the one non-ScalarMul factor,
    # so -P and P - cI are labelled PSD and 0.5 I is labelled Unitary. cola.linalg.inv(P - cI)
    # then takes the Cholesky/CG path and fails or is wrong: never rely on the annotation of a
    # negatively scaled or negatively shifted operator. If this test fails, CoLA fixed it.
    P = Doubler(3, {cola.PSD})
    eye = cola.ops.I_like(P)
    assert (-1.0 * P).isa(cola.PSD)
    assert (-P).isa(cola.PSD)
    assert (P - 100.0 * eye).isa(cola.PSD)
    assert (0.5 * eye).isa(cola.Unitary)


# --- products, dense forms and the operator algebra ---------------------------------------


def test_matmul_with_vectors_and_matrices_and_to_dense():
    A = Doubler(4)
    v, V = dense(0, 4, 1)[:, 0], dense(1, 4, 3)
    assert (A @ v).shape == (4,)
    assert (A @ V).shape == (4, 3)
    assert torch.equal(A @ v, 2 * v)
    assert torch.equal(A @ V, 2 * V)
    assert torch.equal(A.to_dense(), 2 * torch.eye(4, dtype=F64))
    assert A.shape == (4, 4)
    assert A.dtype == F64
    assert A.device == torch.device("cpu")


def test_identity_like():
    A = Doubler(3)
    eye = cola.ops.I_like(A)
    assert isinstance(eye, Identity)
    assert eye.shape == A.shape
    assert eye.dtype == A.dtype
    assert torch.equal(eye.to_dense(), torch.eye(3, dtype=F64))


def test_types_of_the_algebra():
    A, B = Doubler(3), Dense(dense(2, 3))
    assert type(A + B) is Sum[Doubler, Dense]
    assert type(A @ B) is Product[Doubler, Dense]
    assert type(2.0 * A) is Product[ScalarMul, Doubler]
    assert type(A * 2.0) is Product[ScalarMul, Doubler]
    assert type(-A) is Product[ScalarMul, Doubler]
    assert type(A / 2.0) is Product[ScalarMul, Doubler]
    assert type(A - B) is Sum[Doubler, Product[ScalarMul, Dense]]
    assert type(BlockDiag(A, B)) is BlockDiag[Doubler, Dense]
    assert type(Kronecker(A, B)) is Kronecker[Doubler, Dense]
    assert isinstance(A + B, Sum) and [type(M) for M in (A + B).Ms] == [Doubler, Dense]
    assert (A + 0) is A  # adding the number 0 returns the operator itself


def test_damped_sum_type():
    # G + λ I is how users damp; the dispatch rules match these exact types
    A = Doubler(3)
    eye = cola.ops.I_like(A)
    scaled = 0.5 * eye
    assert type(scaled) is Product[ScalarMul, Identity]
    assert [type(M) for M in scaled.Ms] == [ScalarMul, Identity]
    assert scaled.Ms[0].c == 0.5
    assert type(eye * 0.5) is Product[ScalarMul, Identity]
    damped = A + scaled
    assert type(damped) is Sum[Doubler, Product[ScalarMul, Identity]]
    assert type(A + eye) is Sum[Doubler, Identity]
    assert type(scaled + A) is Sum[Product[ScalarMul, Identity], Doubler]
    assert torch.allclose(damped.to_dense(), 2.5 * torch.eye(3, dtype=F64))


def test_dense_forms_of_sum_product_scalarmul_blockdiag_kronecker():
    A, B, C = dense(3, 2), dense(4, 3), dense(5, 3, 2)
    assert torch.allclose((Dense(B) + Dense(B.T)).to_dense(), B + B.T)
    assert torch.allclose((Dense(B) @ Dense(C)).to_dense(), B @ C)
    assert (Dense(B) @ Dense(C)).shape == (3, 2)
    assert torch.allclose((2.0 * Dense(A)).to_dense(), 2 * A)
    block = BlockDiag(Dense(A), Dense(B))
    assert block.shape == (5, 5)
    assert torch.allclose(block.to_dense(), torch.block_diag(A, B))
    kron = Kronecker(Dense(A), Dense(B))
    assert kron.shape == (6, 6)
    assert torch.allclose(kron.to_dense(), torch.kron(A, B))
    v, V = dense(6, 6, 1)[:, 0], dense(7, 6, 4)
    assert torch.allclose(kron @ v, torch.kron(A, B) @ v)
    assert torch.allclose(kron @ V, torch.kron(A, B) @ V)
    assert torch.allclose(block @ V[:5], torch.block_diag(A, B) @ V[:5])


# --- solvers ------------------------------------------------------------------------------


def test_cg_inverse_of_a_psd_operator():
    A = cola.PSD(Dense(spd(7, 4)))
    b = dense(8, 4, 1)[:, 0]
    x = cola.linalg.inv(A, alg=cola.linalg.CG(tol=1e-12)) @ b
    assert torch.allclose(A.to_dense() @ x, b, atol=1e-9)


@pytest.fixture
def jax_x64():
    """JAX with float64 enabled for the test, restored afterwards."""
    jax = pytest.importorskip("jax", reason="jax is not installed (the 'test' extra installs it)")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


def test_jax_clip_shim_is_in_effect(jax_x64):
    import jax.numpy as jnp
    from cola.backends import jax_fns

    assert jax_fns.clip is _compat._jax_clip
    x = jnp.asarray([-1.0, 0.5, 3.0])
    assert np.array_equal(np.asarray(jax_fns.clip(x, a_min=0.0)), [0.0, 0.5, 3.0])
    assert np.array_equal(np.asarray(jax_fns.clip(x, 0.0, 1.0)), [0.0, 0.5, 1.0])


class JaxMatrix(LinearOperator):
    """A custom operator on JAX arrays."""

    def __init__(self, M):
        super().__init__(M.dtype, M.shape)
        self.M = M

    def _matmat(self, X):
        return self.M @ X


@pytest.mark.parametrize("wrap", [Dense, JaxMatrix], ids=["dense", "custom"])
def test_gmres_on_a_jax_operator_works_after_import(jax_x64, wrap):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    M = jnp.asarray(rng.standard_normal((5, 5)) + 5 * np.eye(5))
    b = jnp.asarray(rng.standard_normal(5))
    A = wrap(M)
    assert A.dtype == jnp.float64
    assert (A @ b).shape == (5,)
    assert (A @ jnp.ones((5, 2))).shape == (5, 2)
    x = cola.linalg.inv(A, alg=cola.linalg.GMRES(tol=1e-12, max_iters=50)) @ b
    assert x.dtype == jnp.float64
    assert np.allclose(np.asarray(M @ x), np.asarray(b), atol=1e-8)


def test_library_lookup_is_cached_and_used_by_cola(jax_x64):
    import jax.numpy as jnp
    from cola.backends import jax_fns, torch_fns
    from cola.ops import operator_base

    lookup = operator_base.get_library_fns
    assert lookup is cola.backends.get_library_fns
    assert lookup.__wrapped__ is not lookup
    assert lookup(torch.float64) is torch_fns
    assert lookup(jnp.float64) is jax_fns
    for dtype in (torch.float32, jnp.float32, np.dtype("float64")):
        assert lookup(dtype) is lookup.__wrapped__(dtype)
    assert Dense(torch.eye(2, dtype=torch.float64)).xnp is torch_fns
