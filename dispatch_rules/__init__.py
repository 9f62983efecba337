"""Plum rules that extend ``cola.linalg`` for cola_curvature's operator types, registered on import.

One module per CoLA function. Each rule starts with a comment giving the identity it uses.
Rules keyed on structure carry ``precedence=1`` so that they win over CoLA's generic rules
keyed on an algorithm (``(LinearOperator, Lanczos)`` and the like).
"""

from dispatch_rules import add, diag, eig, inv, logdet, mul, sqrt, trace

__all__ = ["add", "diag", "eig", "inv", "logdet", "mul", "sqrt", "trace"]
