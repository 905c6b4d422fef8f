"""The SFA-ControlNet: a trainable copy of the SD encoder that reads the LR image and both prompts.

It is the shared ``SDEncoder`` with semantic-fusion attention (``semantic_fusion.py``, Eq. 1/2)
in every cross-attention layer, plus the LR image encoder added to conv_in's output, the zero
convolutions that make the UNet's residuals, and the degradation-free-constraint heads (Sec.
3.5). Module and parameter names follow the official checkpoint (diffusers layout), so its
state dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFunction, sdpa_attention
from .config import ControlNetConfig
from .encoder import SDEncoder
from .operations import Operations, default_operations


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
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
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


class SFAControlNet(SDEncoder):
    """XPSR's ControlNet with semantic-fusion attention and degradation-free-constraint heads."""

    def __init__(self, config: ControlNetConfig, *, attention: AttentionFunction = sdpa_attention,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        kw = dict(operations=operations, device=device, dtype=dtype)
        super().__init__(config, config.fusion, attention=attention, input_embedding=lambda: LRConditioningEmbedding(
            config.block_out_channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels,
            config.return_rgbs, **kw), **kw)
        self.config = config
        conv = dict(device=device, dtype=dtype)
        ch = config.block_out_channels
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

        sample (B, 4, h, w) noisy latent; encoder_hidden_states c_h and
        lowlevel_encoder_hidden_states c_l (B, 77, 768); ``controlnet_cond`` (B, 3, 8h, 8w) the
        upscaled LR image in [0, 1]. The residuals are (B, C_i, h_i, w_i), one per UNet skip
        (``residual_channels``), and (B, C_mid, h/8, w/8) for the mid block.
        ``return_dfc`` also computes the DFC heads, which only training needs;
        ``transformer_options`` go to every attention call (see ``AttentionFunction``).
        """
        cfg = self.config
        temb = self.time_embedding(timestep, sample)
        cond, rgbs = self.controlnet_cond_embedding(controlnet_cond, return_dfc and cfg.return_rgbs)
        x, skips = self.encode(sample, temb, encoder_hidden_states, lowlevel_encoder_hidden_states, cond,
                               transformer_options)

        residuals = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        out = ControlNetOutput([r * conditioning_scale for r in residuals], mid * conditioning_scale)
        if return_dfc:
            out.dfc_rgb = rgbs if cfg.return_rgbs else None
            if cfg.use_latent_pred:
                out.dfc_latent = [head(r) for head, r in zip(self.conv_degradation, residuals, strict=True)]
                out.dfc_latent_mid = self.conv_degradation_mid(mid)
        return out
