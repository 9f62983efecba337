"""User-facing options as string enums; plain strings are accepted and validated."""

from __future__ import annotations

from enum import Enum
from typing import Any


class Reduction(str, Enum):
    """How per-term losses are combined into the empirical risk.

    Attributes:
        SUM: ``L = Σ_n ℓ_n``.
        MEAN: ``L = (1 / (N · T)) Σ_n ℓ_n`` with ``T`` the number of loss terms per
            example, exactly as PyTorch's ``reduction="mean"`` on the whole data set.

    """

    SUM = "sum"
    MEAN = "mean"


class FisherType(str, Enum):
    """Which output-space matrix KFAC's output factor is built from.

    Attributes:
        TYPE2: the columns of the loss Hessian's symmetric factor, backpropagated (exact
            GGN statistics; ``C`` backward passes per batch).
        MC: ``mc_samples`` output gradients at targets sampled from the model's likelihood.
        EMPIRICAL: the output gradient at the observed targets.
        FORWARD_ONLY: no backward pass; the output factor is the identity.
    """

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"

    @classmethod
    def _missing_(cls, value: object) -> FisherType | None:
        """Return the member for another library's spelling or enum, ``None`` if unknown.

        Strings are matched case-insensitively with ``_`` read as ``-`` (``"type_2"``,
        ``"forward_only"``) and through :data:`FISHER_TYPE_ALIASES` (``"ef"`` of
        laplace-torch, ``"type2"``, ``"ggn"``). Members of any other ``Enum``, such as
        curvlinops' ``FisherType``, are matched by their ``value``, then their ``name``.
        """
        if isinstance(value, Enum):
            return cls._missing_(value.value) or cls._missing_(value.name)
        if not isinstance(value, str):
            return None
        spelling = value.strip().lower().replace("_", "-")
        return cls._value2member_map_.get(FISHER_TYPE_ALIASES.get(spelling, spelling))

    @classmethod
    def accepted_spellings(cls) -> list[str]:
        """Return the values and aliases :class:`FisherType` accepts, for error messages."""
        return [member.value for member in cls] + list(FISHER_TYPE_ALIASES)


#: Other spellings of the :class:`FisherType` values (after lower-casing and ``_`` → ``-``).
FISHER_TYPE_ALIASES = {
    "type2": "type-2",
    "ggn": "type-2",
    "ef": "empirical",
    "empirical-fisher": "empirical",
}


class KFACApprox(str, Enum):
    """How KFAC treats weight sharing (sequence positions, convolution patches).

    Attributes:
        EXPAND: every shared position is an independent example (Eschenhagen et al., 2023).
        REDUCE: inputs are averaged and output gradients summed over positions first.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class Uncovered(str, Enum):
    """What KFAC and EKFAC do with parameters that no Kronecker layer owns.

    Attributes:
        ERROR: raise, naming those parameters.
        DIAGONAL: one exact diagonal block of the matching curvature (GGN, Monte-Carlo or
            empirical Fisher), ``O(d)`` memory, built by per-example reverse passes.
        DENSE: one exact dense block of that curvature, ``O(d²)`` memory and ``d`` products.
    """

    ERROR = "error"
    DIAGONAL = "diagonal"
    DENSE = "dense"


class SharedWeights(str, Enum):
    """What KFAC and EKFAC do with a weight that several layer calls use (a tied lm-head).

    Attributes:
        KRONECKER: one block, the nearest Kronecker product (Frobenius norm) of the sum of
            the uses' blocks (:mod:`cola_curvature.kfac_statistics.shared_weights`).
        UNCOVERED: no Kronecker block; the weight is left to ``uncovered`` (its exact
            diagonal or dense block, or an error).
    """

    KRONECKER = "kronecker"
    UNCOVERED = "uncovered"


class DampingMode(str, Enum):
    """How damping ``λ`` enters a Kronecker-factored block.

    Attributes:
        EXACT: ``G ⊗ A + λ I``, inverted exactly through both eigenbases.
        HEURISTIC: ``(G + √λ/π I) ⊗ (A + π√λ I)`` (Martens & Grosse, 2015).
    """

    EXACT = "exact"
    HEURISTIC = "heuristic"


class SymmetryGroup(str, Enum):
    """A weight-space symmetry group acting on an ``m × n`` weight matrix ``W``.

    Attributes:
        ORTHOGONAL_ROWS: ``W → QW``, ``Q ∈ O(m)``.
        ORTHOGONAL_COLS: ``W → WQ``, ``Q ∈ O(n)``.
        ORTHOGONAL_BOTH: ``W → Q₁ W Q₂``.
        PERMUTATION_ROWS: ``W → ΠW``, ``Π ∈ S_m`` (permuting hidden units).
    """

    ORTHOGONAL_ROWS = "orthogonal-rows"
    ORTHOGONAL_COLS = "orthogonal-cols"
    ORTHOGONAL_BOTH = "orthogonal-both"
    PERMUTATION_ROWS = "permutation-rows"


def parse_option(enum: type[Enum], value: Any, what: str) -> Any:
    """Return the member of ``enum`` for ``value`` (a member or its string).

    Raises:
        ValueError: naming ``what`` and listing the valid values.
    """
    try:
        return enum(value)
    except ValueError:
        spellings = getattr(enum, "accepted_spellings", lambda: [m.value for m in enum])()
        valid = ", ".join(repr(spelling) for spelling in spellings)
        raise ValueError(f"Unsupported {what} {value!r}; expected one of {valid}.") from None


class OnFailure(str, Enum):
    """What an iterative method does when it stops above its tolerance.

    WARN: return the last iterate with a ``ConvergenceWarning``; RAISE: raise
    ``ConvergenceError`` (outside compiled code).
    """

    WARN = "warn"
    RAISE = "raise"


class SubsetOfWeights(str, Enum):
    """Which parameters a Laplace posterior covers.

    ALL: every entry of ``params``; LAST_LAYER: the last layer's; SUBNETWORK: the chosen
    tensors or indices.
    """

    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


class PredictiveMethod(str, Enum):
    """How class probabilities are taken from a Gaussian over logits.

    PROBIT: MacKay's probit approximation; MC: an average over sampled logits.
    """

    PROBIT = "probit"
    MC = "mc"


class LaplaceCurvature(str, Enum):
    """The curvature names a Laplace posterior is built from (see ``laplace_curvatures``)."""

    KFAC = "kfac"
    EKFAC = "ekfac"
    DIAG = "diag"
    FULL = "full"
    GGN = "ggn"
    LOWRANK = "lowrank"
    SYMMETRY = "symmetry"
