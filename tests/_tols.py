"""Named tolerances shared by the tests (float64 unless a name says otherwise)."""

#: Relative (Frobenius) error allowed between an exact operator and its dense float64
#: reference, and between two exact routes to the same matrix.
EXACT_RTOL = 1e-10

#: Absolute error allowed next to ``EXACT_RTOL`` for entries that are zero in exact
#: arithmetic (e.g. blocks of parameters that do not interact).
EXACT_ATOL = 1e-12

#: Largest entry-wise difference allowed between two products that should be identical
#: (same operator, same vector, same process); ``0.0`` would demand bitwise equality.
DETERMINISM_ATOL = 1e-14

#: Relative error allowed between a SciPy ``LinearOperator`` product and ``@``; both run
#: the same float64 arithmetic, only the NumPy round trip differs.
SCIPY_RTOL = 1e-12

#: Relative error allowed between central finite differences of the gradient and the
#: Hessian (step ``FINITE_DIFFERENCE_STEP``; truncation error is ``O(h²)``).
FINITE_DIFFERENCE_RTOL = 1e-6
FINITE_DIFFERENCE_STEP = 1e-4

#: Relative (Frobenius) error allowed for a Monte-Carlo Fisher with thousands of samples
#: against the GGN (the error shrinks like ``1/sqrt(mc_samples)``).
MC_RTOL = 0.05

#: A Monte-Carlo Fisher with thousands of samples must be at least this many times closer
#: to the GGN than one with a single sample.
MC_IMPROVEMENT = 5.0

#: Smallest eigenvalue allowed for a matrix that must be positive semi-definite, relative
#: to its largest eigenvalue.
PSD_RTOL = 1e-12
