"""Reference models users train, in plain torch: a nanoGPT-style decoder and a ResNet.

They exist so that every operator can be tested and benchmarked on the architectures
users bring (token and position embeddings, LayerNorm or RMSNorm, fused attention, a
tied lm-head; BatchNorm, residual adds, adaptive pooling), at tiny sizes in the tests
and at millions of parameters in ``benchmarks/large.py``. Importing this package needs
torch; the JAX twin of the decoder is :mod:`cola_curvature.models.gpt_jax`.
"""

from cola_curvature.models.gpt import GPT, GPTConfig
from cola_curvature.models.resnet import ResNet, resnet

__all__ = ["GPT", "GPTConfig", "ResNet", "resnet"]
