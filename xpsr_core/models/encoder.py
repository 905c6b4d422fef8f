"""The SD UNet's encoder, the one part the UNet and the SFA-ControlNet share.

A ControlNet is a trainable copy of the encoder (conv_in, time embedding, down blocks, mid
block), so both models are built from this class and keep diffusers' key names at their top
level. The only difference is each layer's cross-attention: the UNet's text attention over
c_h, or the ControlNet's semantic-fusion attention over c_h and c_l (Eq. 1/2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .attention import AttentionFunction, Transformer2D
from .blocks import Downsample2D, ResnetBlock2D, TimestepEmbedding
from .config import UNetShape
from .operations import Operations
from .semantic_fusion import semantic_fusion


def _layer_attentions(channels: int, shape: UNetShape, heads: int, depth: int, count: int, fusion: str | None, *,
                      attention: AttentionFunction, operations: Operations, device: Any, dtype: torch.dtype | None
                      ) -> tuple[nn.ModuleList, nn.ModuleList | None, nn.ModuleList | None]:
    """The cross-attentions of ``count`` layers: text (CA_h) and, with a fusion, low-level (CA_l) and connect (CA_f).

    The connect attention's context is the C-channel low-level feature map, not text. They
    are created connect first, as the official code does, so seeded initialisations match.
    """

    def make(context_dim: int) -> nn.ModuleList:
        return nn.ModuleList([
            Transformer2D(channels, context_dim, heads, depth=depth, groups=shape.norm_num_groups,
                          attention=attention, operations=operations, device=device, dtype=dtype)
            for _ in range(count)
        ])

    if fusion is None:
        return make(shape.cross_attention_dim), None, None
    connect = make(channels) if fusion == "parallel" else None
    return make(shape.cross_attention_dim), make(shape.cross_attention_dim), connect


class _CrossAttentionLayers(nn.Module):
    """A block's per-layer cross-attentions, under the official key names (attentions, attentions_lowlevel,
    attentions_connect)."""

    fusion: str | None
    attentions: nn.ModuleList | None

    def cross_attention(self, layer: int, x: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None,
                        transformer_options: dict | None) -> torch.Tensor:
        if self.fusion is None:
            return self.attentions[layer](x, c_h, transformer_options)
        connect = self.attentions_connect[layer] if self.attentions_connect is not None else None
        return semantic_fusion(x, c_h, c_l, self.attentions[layer], self.attentions_lowlevel[layer], connect,
                               self.fusion, transformer_options)


class DownBlock(_CrossAttentionLayers):
    """An encoder block: (resnet, cross-attention where the block has one) per layer, then a downsampler."""

    def __init__(self, in_channels: int, out_channels: int, shape: UNetShape, block: int, add_downsample: bool,
                 fusion: str | None, *, attention: AttentionFunction, operations: Operations, device: Any,
                 dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.fusion = fusion
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, shape.time_embed_dim,
                          groups=shape.norm_num_groups, eps=shape.norm_eps, **kw)
            for i in range(shape.layers_per_block)
        ])
        if shape.has_attention(block):
            self.attentions, self.attentions_lowlevel, self.attentions_connect = _layer_attentions(
                out_channels, shape, shape.num_heads[block], shape.transformer_layers_per_block[block],
                shape.layers_per_block, fusion, attention=attention, **kw)
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, **kw)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The block's output and its skips (one per layer, then the downsampled map)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.cross_attention(i, x, c_h, c_l, transformer_options)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(_CrossAttentionLayers):
    """resnet, cross-attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, shape: UNetShape, fusion: str | None, *, attention: AttentionFunction,
                 operations: Operations, device: Any, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.fusion = fusion
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, shape.time_embed_dim, groups=shape.norm_num_groups,
                          eps=shape.norm_eps, output_scale_factor=shape.mid_block_scale_factor, **kw)
            for _ in range(2)
        ])
        self.attentions, self.attentions_lowlevel, self.attentions_connect = _layer_attentions(
            channels, shape, shape.num_heads[-1], shape.transformer_layers_per_block[-1], 1, fusion,
            attention=attention, **kw)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.cross_attention(0, x, c_h, c_l, transformer_options), temb)


class SDEncoder(nn.Module):
    """conv_in, time_embedding, down_blocks and mid_block of SD's UNet; subclasses add their own heads.

    ``fusion`` None gives the UNet's text attentions; "parallel" or "serial" the
    SFA-ControlNet's semantic-fusion attentions. ``input_embedding`` builds the ControlNet's LR
    image encoder, registered as ``controlnet_cond_embedding``; it is built between the time
    embedding and the down blocks, the official order, so the parameters keep their order
    (optimizer states their meaning) and a seeded initialisation its values.
    """

    def __init__(self, shape: UNetShape, fusion: str | None, *, input_embedding: Callable[[], nn.Module] | None = None,
                 attention: AttentionFunction, operations: Operations, device: Any, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        ch = shape.block_out_channels
        self.conv_in = operations.Conv2d(shape.in_channels, ch[0], 3, padding=1, device=device, dtype=dtype)
        self.time_embedding = TimestepEmbedding(ch[0], shape.time_embed_dim, shape.flip_sin_to_cos, shape.freq_shift,
                                                **kw)
        if input_embedding is not None:
            self.controlnet_cond_embedding = input_embedding()
        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for i, c_out in enumerate(ch):
            self.down_blocks.append(DownBlock(c_in, c_out, shape, i, i != len(ch) - 1, fusion, attention=attention,
                                              **kw))
            c_in = c_out
        self.mid_block = MidBlock(ch[-1], shape, fusion, attention=attention, **kw)

    def encode(self, sample: torch.Tensor, temb: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None = None,
               added: torch.Tensor | None = None,
               transformer_options: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mid block's output and every skip in encoder order (the first is conv_in's output).

        sample (B, 4, h, w) latent; temb (B, 4 * C0) time embedding; c_h, c_l (B, L, D) prompt
        embeddings; ``added`` (B, C0, h, w) is added to conv_in's output (the ControlNet's LR
        image features). Skips are (B, C_i, h_i, w_i) with the channels of
        ``UNetShape.residual_channels``.
        """
        x = self.conv_in(sample)
        if added is not None:
            x = x + added
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, c_h, c_l, transformer_options)
            skips += block_skips
        return self.mid_block(x, temb, c_h, c_l, transformer_options), skips
