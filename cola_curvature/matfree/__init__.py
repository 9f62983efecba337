"""Backend-neutral matrix-free linear algebra on CoLA operators: Krylov methods and estimators.

Everything here works on any square CoLA operator through its ``xnp`` backend functions
and ``@`` with many columns, so torch and JAX operators run the same code.
"""
