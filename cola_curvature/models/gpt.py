"""A nanoGPT-style decoder-only transformer (Radford et al., 2019; Karpathy's nanoGPT layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """The decoder's sizes and variants.

    Args:
        vocab_size: Number of tokens ``V``.
        context: Longest sequence ``T_max`` (rows of the position embedding).
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block (``n_embd`` must be divisible by it).
        n_embd: Width ``E`` of the residual stream.
        tie_weights: Share the lm-head weight with the token embedding (``W_head = W_te``).
        attention: ``"sdpa"`` (one packed ``c_attn`` Linear and
            ``F.scaled_dot_product_attention``, as nanoGPT) or ``"mha"``
            (``nn.MultiheadAttention``).
        need_weights: For ``"mha"``: ask for the attention weights (torch then runs the
            unfused math path); ``False`` runs the fused kernel.
        batch_first: For ``"mha"``: build it with ``batch_first`` (otherwise the block
            transposes to ``(T, N, E)`` and back).
        norm: ``"layernorm"`` (``nn.LayerNorm``) or ``"rmsnorm"`` (written out in code:
            ``x / √(mean(x²) + ε) · w``).
        bias: Whether Linear layers and LayerNorms have biases.
        classes_first: Return logits as ``(N, V, T)`` (what ``nn.CrossEntropyLoss`` takes
            with ``(N, T)`` targets) instead of ``(N, T, V)``.
    """

    vocab_size: int = 4096
    context: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    tie_weights: bool = True
    attention: str = "sdpa"
    need_weights: bool = False
    batch_first: bool = True
    norm: str = "layernorm"
    bias: bool = True
    classes_first: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "mha"):
            raise ValueError(f"attention must be 'sdpa' or 'mha', got {self.attention!r}.")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")


class RMSNorm(nn.Module):
    """``x / √(mean(x²) + ε) · w`` over the last axis, written in plain tensor code."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised and scaled ``x``."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(config: GPTConfig) -> nn.Module:
    """Return the block's normalisation layer."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with one packed ``q, k, v`` projection (nanoGPT)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``c_proj(softmax(q kᵀ / √d + causal) v)`` for ``x`` of shape ``(N, T, E)``."""
        n, t, e = x.shape
        q, k, v = self.c_attn(x).split(e, dim=2)
        q, k, v = (z.view(n, t, self.n_head, e // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, e))


class MHAttention(nn.Module):
    """Causal self-attention through ``nn.MultiheadAttention`` (packed ``in_proj_weight``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.need_weights = config.need_weights
        self.batch_first = config.batch_first
        self.mha = nn.MultiheadAttention(
            config.n_embd, config.n_head, bias=config.bias, batch_first=config.batch_first
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the attention output for ``x`` of shape ``(N, T, E)``."""
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        x = x if self.batch_first else x.transpose(0, 1)
        y, _ = self.mha(x, x, x, attn_mask=mask, need_weights=self.need_weights)
        return y if self.batch_first else y.transpose(0, 1)


class MLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))`` with a hidden width of ``4 E``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block's feed-forward output."""
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = (
            CausalSelfAttention(config) if config.attention == "sdpa" else MHAttention(config)
        )
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer: token ids ``(N, T)`` to next-token logits.

    ``h_0 = W_te[x] + W_pe[0:T]``, ``n_layer`` pre-norm blocks, a final norm and the
    lm-head ``logits = h W_headᵀ`` (``W_head = W_te`` when ``tie_weights``). Logits are
    ``(N, V, T)`` by default, so ``nn.CrossEntropyLoss()(model(x), y)`` with targets ``y``
    of shape ``(N, T)`` is the mean next-token loss. Parameters are initialised as in
    GPT-2 (normal, std 0.02; residual projections scaled by ``1/√(2 n_layer)``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """Initialise as GPT-2: ``N(0, 0.02²)`` weights, zero biases, scaled projections."""
        std = 0.02
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() >= 2:
                    scale = (2 * self.config.n_layer) ** -0.5 if "proj.weight" in name else 1.0
                    p.normal_(0.0, std * scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Return the logits for token ids ``idx`` of shape ``(N, T)``, ``T ≤ context``."""
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.config.context}.")
        positions = torch.arange(t, device=idx.device)
        h = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.ln_f(h))
        return logits.transpose(1, 2) if self.config.classes_first else logits
