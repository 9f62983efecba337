"""Backend-neutral KFAC maths on captured layer signals, below the operators and the backends.

``moments``: the factor statistics ``Σ ã ãᵀ`` and ``R Σ g gᵀ`` and EKFAC's eigenvalue
corrections from layer inputs and output gradients; ``shared_weights``: one block for a
weight several calls use; ``chunking``: how many per-example gradients the exact diagonal
holds at once. The backends capture the signals (hooks on torch calls, a jaxpr
replay in JAX) and call these functions; the operators aggregate their results.
"""
