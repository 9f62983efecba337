"""Curvature matrices as CoLA linear operators, one family per module."""

from cola_curvature.operators._base import CurvatureOperator
from cola_curvature.operators.diagonal import DiagonalBlock, DiagonalCurvature
from cola_curvature.operators.ekfac import EKFAC
from cola_curvature.operators.empirical_fisher import EmpiricalFisher
from cola_curvature.operators.fisher import FisherMC
from cola_curvature.operators.ggn import GGN
from cola_curvature.operators.gradient_moments import GradientMoments
from cola_curvature.operators.hessian import Hessian
from cola_curvature.operators.jacobian import Jacobian, JacobianTranspose
from cola_curvature.operators.kfac import KFAC
from cola_curvature.operators.kronecker import KroneckerFactored
from cola_curvature.operators.kronecker_blocks import EigenKronecker, KroneckerBlock
from cola_curvature.operators.shifted import ShiftedCurvature
from cola_curvature.operators.submatrix import Submatrix
from cola_curvature.operators.symmetry import SymmetryCurvature

__all__ = [
    "CurvatureOperator",
    "DiagonalBlock",
    "DiagonalCurvature",
    "EKFAC",
    "EigenKronecker",
    "EmpiricalFisher",
    "FisherMC",
    "GGN",
    "GradientMoments",
    "Hessian",
    "Jacobian",
    "JacobianTranspose",
    "KFAC",
    "KroneckerBlock",
    "KroneckerFactored",
    "ShiftedCurvature",
    "Submatrix",
    "SymmetryCurvature",
]
