"""The UNet's conditional ("pixel") attention: XPSR's one addition to the frozen SD UNet.

After every decoder layer (resnet and, where present, text attention; before the
upsampler) a Transformer2D cross-attends from the decoder feature to the ControlNet
residual of the skip that layer consumed, flattened to tokens. The module set is kept
apart from any UNet so that ComfyUI's own SD1.5 UNet and this package's UNet both call it
per decoder layer; its parameter names are those of the official UNet
(``up_blocks.{b}.pixel_attentions.{j}.*``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import AttentionFunction, Transformer2D, feature_map_to_tokens, sdpa_attention
from .config import UNetConfig
from .operations import Operations, default_operations

PIXEL_ATTENTIONS_KEY = ".pixel_attentions."
"""In every key of the conditional attention in an official XPSR UNet state dict (a UNet without it is stock SD)."""


class _UpBlockPixelAttentions(nn.Module):
    def __init__(self, attentions: list[Transformer2D]):
        super().__init__()
        self.pixel_attentions = nn.ModuleList(attentions)


class ConditionalAttention(nn.Module):
    """All conditional attentions of a UNet, addressed by decoder layer in execution order."""

    def __init__(self, config: UNetConfig, *, attention: AttentionFunction = sdpa_attention,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.layers = config.decoder_layers()
        blocks: list[list[Transformer2D]] = [[] for _ in config.up_block_types]
        for d in self.layers:
            blocks[d.block].append(Transformer2D(
                d.channels, d.context_channels, d.heads, depth=d.depth, groups=config.norm_num_groups,
                attention=attention, operations=operations, device=device, dtype=dtype))
        self.up_blocks = nn.ModuleList([_UpBlockPixelAttentions(b) for b in blocks])

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, hidden: torch.Tensor, layer: int, residuals: Sequence[torch.Tensor],
                transformer_options: dict | None = None) -> torch.Tensor:
        """Apply the attention of decoder layer ``layer`` (0 = first layer after the mid block).

        ``hidden`` is the decoder feature (B, C, H, W); ``residuals`` are the ControlNet's down
        residuals in encoder order, (B, C_i, H_i, W_i), already multiplied by the conditioning
        scale. Decoder layer i consumes the skip popped i-th from the end, and so attends to
        ``residuals[-1 - i]``: the same pairing as the skips. ``transformer_options`` go to
        the attention calls (see ``AttentionFunction``).
        """
        if len(residuals) != len(self.layers):
            raise ValueError(f"conditional attention needs {len(self.layers)} ControlNet residuals, "
                             f"got {len(residuals)}")
        d = self.layers[layer]
        context = feature_map_to_tokens(residuals[-1 - layer]).to(hidden.dtype)
        return self.up_blocks[d.block].pixel_attentions[d.layer](hidden, context, transformer_options)
