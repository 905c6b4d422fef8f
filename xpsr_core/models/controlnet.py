"""The SFA-ControlNet: a trainable copy of the SD encoder that reads the LR image and both prompts.

Module and parameter names follow the official checkpoint (diffusers layout), so its state
dict loads without renaming. Per cross-attention layer the ControlNet holds three
Transformer2Ds: ``attentions`` (x, c_h), ``attentions_lowlevel`` (x, c_l) and
``attentions_connect`` (query from the high-level result, keys/values from the low-level
result's tokens); together they are the paper's semantic-fusion attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFunction, Operations, Transformer2D, feature_map_to_tokens, sdpa_attention
from .blocks import Downsample2D, ResnetBlock2D, TimestepEmbedding
from .config import ControlNetConfig


@dataclass
class ControlNetOutput:
    """Residuals for the UNet and, when asked for, the degradation-free-constraint predictions.

    ``down_residuals`` and ``mid_residual`` are multiplied by the conditioning scale;
    ``dfc_latent`` / ``dfc_latent_mid`` are computed from the unscaled residuals, as in the
    official code.
    """

    down_residuals: list[torch.Tensor]
    mid_residual: torch.Tensor
    dfc_rgb: list[torch.Tensor] | None = None
    dfc_latent: list[torch.Tensor] | None = None
    dfc_latent_mid: torch.Tensor | None = None


class LRConditioningEmbedding(nn.Module):
    """The pyramid encoder of the LR image; ``to_rgbs`` are the pixel-space DFC heads."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple[int, ...], return_rgbs: bool, *,
                 operations: Operations = nn, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv_in = operations.Conv2d(in_channels, channels[0], 3, padding=1, **kw)
        self.blocks = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(operations.Conv2d(c_in, c_in, 3, padding=1, **kw))
            self.blocks.append(operations.Conv2d(c_in, c_out, 3, padding=1, stride=2, **kw))
            if return_rgbs:
                self.to_rgbs.append(operations.Conv2d(c_out, 3, 3, padding=1, **kw))
        self.conv_out = operations.Conv2d(channels[-1], out_channels, 3, padding=1, **kw)

    def forward(self, image: torch.Tensor, return_rgbs: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = F.silu(self.conv_in(image))
        rgbs = []
        for i, block in enumerate(self.blocks):
            x = F.silu(block(x))
            if i % 2 and return_rgbs:
                rgbs.append(self.to_rgbs[i // 2](x))
        return self.conv_out(x), rgbs


def semantic_fusion(x: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None, high: Transformer2D,
                    low: Transformer2D, connect: Transformer2D | None, fusion: str,
                    transformer_options: dict | None = None) -> torch.Tensor:
    """Semantic-fusion attention on one feature map.

    parallel (paper Eq. 2, the released model): CA_f(CA_h(x, c_h), CA_l(x, c_l)), the fusion
    taking its query from the high-level branch and keys/values from the low-level tokens.
    serial (Eq. 1, the paper's ablation): CA_l(CA_h(x, c_h), c_l).
    Without a low-level embedding the official code keeps the high-level branch only.
    ``transformer_options`` go to every attention call (see ``AttentionFunction``).
    """
    x_h = high(x, c_h, transformer_options)
    if c_l is None:
        return x_h
    if fusion == "serial":
        return low(x_h, c_l, transformer_options)
    return connect(x_h, feature_map_to_tokens(low(x, c_l, transformer_options)), transformer_options)


class SFADownBlock(nn.Module):
    """A ControlNet encoder block; with attention, every layer is resnet then semantic fusion."""

    def __init__(self, in_channels: int, out_channels: int, config: ControlNetConfig, block: int, add_downsample: bool,
                 *, attention: AttentionFunction, operations: Operations, device: Any, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.fusion = config.fusion
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, config.time_embed_dim,
                          groups=config.norm_num_groups, eps=config.norm_eps, **kw)
            for i in range(config.layers_per_block)
        ])
        if config.has_attention(block):
            self.attentions, self.attentions_lowlevel, self.attentions_connect = _sfa_lists(
                out_channels, config, config.num_heads[block], config.transformer_layers_per_block[block],
                config.layers_per_block, attention=attention, **kw)
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, **kw)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None,
                transformer_options: dict | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                connect = self.attentions_connect[i] if self.attentions_connect is not None else None
                x = semantic_fusion(x, c_h, c_l, self.attentions[i], self.attentions_lowlevel[i], connect, self.fusion,
                                    transformer_options)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class SFAMidBlock(nn.Module):
    def __init__(self, channels: int, config: ControlNetConfig, *, attention: AttentionFunction,
                 operations: Operations, device: Any, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        self.fusion = config.fusion
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, config.time_embed_dim, groups=config.norm_num_groups,
                          eps=config.norm_eps, output_scale_factor=config.mid_block_scale_factor, **kw)
            for _ in range(2)
        ])
        self.attentions, self.attentions_lowlevel, self.attentions_connect = _sfa_lists(
            channels, config, config.num_heads[-1], config.transformer_layers_per_block[-1], 1,
            attention=attention, **kw)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, c_h: torch.Tensor, c_l: torch.Tensor | None,
                transformer_options: dict | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        connect = self.attentions_connect[0] if self.attentions_connect is not None else None
        x = semantic_fusion(x, c_h, c_l, self.attentions[0], self.attentions_lowlevel[0], connect, self.fusion,
                            transformer_options)
        return self.resnets[1](x, temb)


def _sfa_lists(channels: int, config: ControlNetConfig, heads: int, depth: int, count: int, *,
               attention: AttentionFunction, operations: Operations, device: Any, dtype: torch.dtype | None
               ) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList | None]:
    """The high-level, low-level and (parallel fusion only) connect attentions of one block."""

    def make(context_dim: int) -> nn.ModuleList:
        return nn.ModuleList([
            Transformer2D(channels, context_dim, heads, depth=depth, groups=config.norm_num_groups,
                          attention=attention, operations=operations, device=device, dtype=dtype)
            for _ in range(count)
        ])

    connect = make(channels) if config.fusion == "parallel" else None
    return make(config.cross_attention_dim), make(config.cross_attention_dim), connect


class SFAControlNet(nn.Module):
    """XPSR's ControlNet with semantic-fusion attention and degradation-free-constraint heads."""

    def __init__(self, config: ControlNetConfig, *, attention: AttentionFunction = sdpa_attention,
                 operations: Operations = nn, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kw = dict(operations=operations, device=device, dtype=dtype)
        conv = dict(device=device, dtype=dtype)
        ch = config.block_out_channels
        self.conv_in = operations.Conv2d(config.in_channels, ch[0], 3, padding=1, **conv)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim, config.flip_sin_to_cos, config.freq_shift,
                                                **kw)
        self.controlnet_cond_embedding = LRConditioningEmbedding(
            ch[0], config.conditioning_channels, config.conditioning_embedding_out_channels, config.return_rgbs, **kw)
        self.down_blocks = nn.ModuleList()
        c_in = ch[0]
        for i, c_out in enumerate(ch):
            self.down_blocks.append(SFADownBlock(c_in, c_out, config, i, i != len(ch) - 1, attention=attention, **kw))
            c_in = c_out
        self.mid_block = SFAMidBlock(ch[-1], config, attention=attention, **kw)
        residual_channels = config.residual_channels()
        self.controlnet_down_blocks = nn.ModuleList([operations.Conv2d(c, c, 1, **conv) for c in residual_channels])
        self.controlnet_mid_block = operations.Conv2d(ch[-1], ch[-1], 1, **conv)
        if config.use_latent_pred:
            self.conv_degradation = nn.ModuleList([
                nn.Sequential(operations.Conv2d(c, config.in_channels, 3, padding=1, **conv)) for c in residual_channels
            ])
            self.conv_degradation_mid = nn.Sequential(
                operations.Conv2d(ch[-1], config.in_channels, 3, padding=1, **conv))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, lowlevel_encoder_hidden_states: torch.Tensor | None = None,
                conditioning_scale: float = 1.0, return_dfc: bool = False,
                transformer_options: dict | None = None) -> ControlNetOutput:
        """Residuals for a noisy latent.

        ``controlnet_cond`` is the upscaled LR image in [0, 1] at 8x the latent size;
        ``return_dfc`` also computes the DFC heads, which only training needs;
        ``transformer_options`` go to every attention call (see ``AttentionFunction``).
        """
        cfg = self.config
        temb = self.time_embedding(timestep, sample)
        cond, rgbs = self.controlnet_cond_embedding(controlnet_cond, return_dfc and cfg.return_rgbs)
        x = self.conv_in(sample) + cond
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, encoder_hidden_states, lowlevel_encoder_hidden_states, transformer_options)
            skips += block_skips
        x = self.mid_block(x, temb, encoder_hidden_states, lowlevel_encoder_hidden_states, transformer_options)

        residuals = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        out = ControlNetOutput([r * conditioning_scale for r in residuals], mid * conditioning_scale)
        if return_dfc:
            out.dfc_rgb = rgbs if cfg.return_rgbs else None
            if cfg.use_latent_pred:
                out.dfc_latent = [head(r) for head, r in zip(self.conv_degradation, residuals, strict=True)]
                out.dfc_latent_mid = self.conv_degradation_mid(mid)
        return out
