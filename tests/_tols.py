"""Named tolerances shared by the tests."""

#: Relative error allowed between an exact operator and its dense float64 reference.
EXACT_RTOL = 1e-10

#: Relative error allowed for a Monte-Carlo Fisher with thousands of samples against the GGN.
MC_RTOL = 0.05
