"""Curvature matrices of neural networks as structured CoLA linear operators."""

# isort: off
from cola_curvature import _compat  # noqa: F401  (pins and shims CoLA before anything uses it)
import dispatch_rules  # noqa: F401  (registers the rules on cola.linalg)

# isort: on
from importlib import import_module
from importlib.util import find_spec
from typing import Any

from cola_curvature import estimators, losses, optim, plotting
from cola_curvature.backends import curvature_backend
from cola_curvature.laplace import Laplace
from cola_curvature.matfree import (
    CG,
    MINRES,
    SLQ,
    Hutchinson,
    HutchPlusPlus,
    LanczosEig,
    LanczosFunction,
    Neumann,
    XDiag,
    XTrace,
)
from cola_curvature.matfree._convergence import ConvergenceError, ConvergenceWarning
from cola_curvature.operators import (
    EKFAC,
    GGN,
    KFAC,
    CurvatureOperator,
    DiagonalBlock,
    DiagonalCurvature,
    EigenKronecker,
    EmpiricalFisher,
    FisherMC,
    GradientMoments,
    Hessian,
    Jacobian,
    JacobianTranspose,
    KroneckerBlock,
    KroneckerFactored,
    ShiftedCurvature,
    Submatrix,
    SymmetryCurvature,
)
from cola_curvature.operators.low_rank import DiagonalPlusLowRank
from cola_curvature.operators.symmetry import Transposed
from cola_curvature.operators.symmetry_blocks import (
    PermutationAveragedBlock,
    shampoo_block,
    symmetry_block,
)
from cola_curvature.options import DampingMode, FisherType, KFACApprox, Reduction, SymmetryGroup
from cola_curvature.preconditioning import preconditioned_step

if find_spec("torch") is not None:  # torch is an optional extra
    import cola_curvature.backends.torch  # noqa: F401  (registers the torch backend)
if find_spec("jax") is not None:  # jax is an optional extra
    import cola_curvature.backends.jax  # noqa: F401  (registers the JAX backend)

__all__ = [
    # matrix-free operators
    "CurvatureOperator",
    "EmpiricalFisher",
    "FisherMC",
    "GGN",
    "Hessian",
    "ShiftedCurvature",
    # Jacobians, gradient moments and blocks of parameter-space operators
    "GradientMoments",
    "Jacobian",
    "JacobianTranspose",
    "Submatrix",
    # algorithms of the matrix-free rules, and how they report failure
    "CG",
    "ConvergenceError",
    "ConvergenceWarning",
    "HutchPlusPlus",
    "Hutchinson",
    "LanczosEig",
    "LanczosFunction",
    "MINRES",
    "Neumann",
    "SLQ",
    "XDiag",
    "XTrace",
    "estimators",
    "plotting",
    # Kronecker-factored and diagonal operators and their structure
    "DiagonalBlock",
    "DiagonalCurvature",
    "DiagonalPlusLowRank",
    "EKFAC",
    "KFAC",
    "EigenKronecker",
    "KroneckerBlock",
    "KroneckerFactored",
    # symmetry-averaged curvature
    "PermutationAveragedBlock",
    "SymmetryCurvature",
    "SymmetryGroup",
    "Transposed",
    "preconditioned_step",
    "shampoo_block",
    "symmetry_block",
    # optimizers (cc.optim.SymmetryPreconditioned, cc.optim.KFAC, cc.optim.symmetry_preconditioned)
    "optim",
    # laplace
    "Laplace",
    # options
    "DampingMode",
    "FisherType",
    "KFACApprox",
    "Reduction",
    # losses
    "losses",
    # backends
    "curvature_backend",
    # factors to and from curvlinops / laplace-torch (imported on first use)
    "interop",
]


def __getattr__(name: str) -> Any:
    """Import :mod:`cola_curvature.interop` on first use (it imports torch, the peers later)."""
    if name == "interop":
        return import_module("cola_curvature.interop")
    raise AttributeError(f"module 'cola_curvature' has no attribute {name!r}")
