"""Matrix-free algorithms on CoLA operators: each one file holding its knobs and its code.

Everything here works on any square CoLA operator through its ``xnp`` backend functions
and ``@`` with many columns, so torch and JAX operators run the same code; no module
imports a backend (random sources and the JAX implicit solve are found by dispatch on the
array type, registered by the backends).

**The interface.** An algorithm is a frozen dataclass of its knobs, passed as ``alg=`` to
a ``cola.linalg`` function, that subclasses the abstract bases of
:mod:`~cola_curvature.matfree.interface` for the questions it answers and implements
their methods; ``A`` is a square, symmetric CoLA operator:

==============================  ========================================  ==================
base                            method                                    ``cola.linalg``
==============================  ========================================  ==================
:class:`TraceEstimator`         ``alg.trace(A) -> tr A``                  ``trace``
:class:`DiagonalEstimator`      ``alg.diagonal(A) -> diag A`` ``(D,)``    ``diag``
:class:`LogdetEstimator`        ``alg.slogdet(A) -> (sign, log|det A|)``  ``logdet``
:class:`LinearSolver`           ``alg.solve(A, B) -> (A⁻¹ B, info)``      ``inv``
:class:`EigenSolver`            ``alg.eigs(A, k, which) -> (λ, V)``       ``eig``
:class:`MatrixFunctionMethod`   ``alg.apply(A, f, V) -> f(A) V``          ``sqrt``, ``isqrt``
==============================  ========================================  ==================

The rules in :mod:`dispatch_rules` dispatch on these bases and call the method, so a new
algorithm is one file here (or anywhere) and no edit of the rules: e.g. ``class
MyTrace(TraceEstimator)`` with ``trace(self, A)`` serves ``cola.linalg.trace(G, MyTrace())``
for every matrix-free curvature operator ``G``.

**The algorithms**, one file per method: :mod:`~.hutchinson` (Hutchinson 1989),
:mod:`~.hutchpp` (Hutch++, Meyer et al. 2021), :mod:`~.xtrace` (XTrace/XDiag, Epperly,
Tropp & Webber 2024), :mod:`~.slq` (stochastic Lanczos quadrature, Ubaru, Chen & Saad
2017, with :class:`~.slq.SpectralQuadrature`), :mod:`~.cg` (conjugate gradients),
:mod:`~.minres` (MINRES, Paige & Saunders 1975), :mod:`~.neumann` (Neumann series),
:mod:`~.lanczos` (Lanczos eigenpairs) and :mod:`~.functions` (Lanczos ``f(A) V``); the
shared Lanczos machinery is in :mod:`~.krylov`, the solvers' common part and ``A⁻¹`` as an
operator in :mod:`~.solvers`.
"""

from cola_curvature.matfree.cg import CG
from cola_curvature.matfree.functions import LanczosFunction
from cola_curvature.matfree.hutchinson import Hutchinson
from cola_curvature.matfree.hutchpp import HutchPlusPlus
from cola_curvature.matfree.interface import (
    DiagonalEstimator,
    EigenSolver,
    LinearSolver,
    LogdetEstimator,
    MatrixFunctionMethod,
    TraceEstimator,
)
from cola_curvature.matfree.lanczos import LanczosEig
from cola_curvature.matfree.minres import MINRES
from cola_curvature.matfree.neumann import Neumann
from cola_curvature.matfree.slq import SLQ, SpectralQuadrature
from cola_curvature.matfree.xtrace import XDiag, XTrace

__all__ = [
    "CG",
    "MINRES",
    "SLQ",
    "DiagonalEstimator",
    "EigenSolver",
    "HutchPlusPlus",
    "Hutchinson",
    "LanczosEig",
    "LanczosFunction",
    "LinearSolver",
    "LogdetEstimator",
    "MatrixFunctionMethod",
    "Neumann",
    "SpectralQuadrature",
    "TraceEstimator",
    "XDiag",
    "XTrace",
]
