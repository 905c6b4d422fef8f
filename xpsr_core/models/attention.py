"""The Transformer2D block used everywhere in XPSR, in diffusers' key layout.

XPSR's text attentions, semantic-fusion branches and conditional (pixel) attentions are
all the same module: GroupNorm, 1x1 projection, one or more (self-attention,
cross-attention, GEGLU feed-forward) blocks, projection back, residual. Only the width
of the cross-attention context differs. Layers come from an ``operations`` namespace
(operations.py's ``default_operations``; ComfyUI passes ``comfy.ops`` so that weights are
cast and offloaded on the fly) and attention from an injectable function, so ComfyUI's own
memory-efficient attention can be used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .operations import Operations, default_operations

AttentionFunction = Callable[..., torch.Tensor]
"""``attention(q, k, v, heads, transformer_options=...)`` on (B, N, heads*dim) tensors, returning (B, Nq, heads*dim).

The call of ComfyUI's ``optimized_attention``: ``transformer_options`` are the options of
the model call being run (ComfyUI's per-call dict, which carries attention overrides), so a
host can pick the kernel per call; the SDPA default ignores them.
"""

def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   transformer_options: dict | None = None) -> torch.Tensor:
    """Multi-head attention through ``scaled_dot_product_attention``.

    PyTorch picks a fused kernel (flash / memory-efficient on CUDA, the flash kernel on CPU)
    that never holds the full attention matrix, which the full-resolution conditional
    attention needs: a 2048 px output has 65,536 tokens per side.
    """
    b, nq, inner = q.shape
    dim = inner // heads
    q, k, v = (t.reshape(b, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, nq, inner)


class Attention(nn.Module):
    """Self- or cross-attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, *, attention: AttentionFunction,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.attention = attention
        self.to_q = operations.Linear(query_dim, query_dim, bias=False, device=device, dtype=dtype)
        self.to_k = operations.Linear(context_dim, query_dim, bias=False, device=device, dtype=dtype)
        self.to_v = operations.Linear(context_dim, query_dim, bias=False, device=device, dtype=dtype)
        self.to_out = nn.ModuleList([operations.Linear(query_dim, query_dim, device=device, dtype=dtype)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = self.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                             transformer_options=transformer_options)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, *, operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.proj = operations.Linear(dim, inner * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, *, operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        # Index 1 is diffusers' dropout (p = 0 in XPSR); it is kept so the keys read net.0 / net.2.
        self.net = nn.ModuleList([
            GEGLU(dim, dim * 4, operations=operations, device=device, dtype=dtype),
            nn.Identity(),
            operations.Linear(dim * 4, dim, device=device, dtype=dtype),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, *, attention: AttentionFunction,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.norm1 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.attn1 = Attention(dim, None, heads, attention=attention, **kw)
        self.norm2 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.attn2 = Attention(dim, context_dim, heads, attention=attention, **kw)
        self.norm3 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.ff = FeedForward(dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), transformer_options=transformer_options) + x
        x = self.attn2(self.norm2(x), context, transformer_options) + x
        return self.ff(self.norm3(x)) + x


class Recomputable(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of kept (training only).

    Training memory is dominated by the blocks' activations, the full-resolution conditional
    attention above all; ``set_gradient_checkpointing`` trades compute for that memory.
    """

    gradient_checkpointing = False

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Switch activation recomputation on or off for every recomputable block inside ``module``."""
    for m in module.modules():
        if isinstance(m, Recomputable):
            m.gradient_checkpointing = enabled


class Transformer2D(Recomputable):
    """diffusers' ``Transformer2DModel`` (continuous input, 1x1-conv projections)."""

    def __init__(self, channels: int, context_dim: int, heads: int, *, depth: int = 1, groups: int = 32,
                 attention: AttentionFunction = sdpa_attention, operations: Operations = default_operations,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.norm = operations.GroupNorm(groups, channels, eps=1e-6, device=device, dtype=dtype)
        self.proj_in = operations.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(channels, context_dim, heads, attention=attention, **kw) for _ in range(depth)
        ])
        self.proj_out = operations.Conv2d(channels, channels, 1, device=device, dtype=dtype)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x))
        hidden = hidden.permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, transformer_options)
        # Back to NCHW memory, as diffusers does: a channels-last view here would make every convolution after it
        # copy its kernel into that layout on each call (59 MB for SD1.5's widest 3x3 kernel).
        hidden = hidden.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(hidden) + x


def feature_map_to_tokens(feature: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) feature map as (B, H*W, C) context tokens."""
    return feature.flatten(2).transpose(1, 2)

