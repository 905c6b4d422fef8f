"""A Stable Diffusion UNet in diffusers' key layout, for use outside ComfyUI (training, parity tests).

Inside ComfyUI the UNet is ComfyUI's own; this one exists so that the core package can run
and train XPSR with nothing but torch. It adds the ControlNet residuals to the skips and
the mid block like a stock ControlNet, and, when given the conditional attention, calls it
after every decoder layer with that layer's residual.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionFunction, Transformer2D, sdpa_attention
from .blocks import ResnetBlock2D, Upsample2D
from .conditional_attention import ConditionalAttention
from .config import UNetConfig
from .encoder import SDEncoder
from .operations import Operations, default_operations


class UpBlock(nn.Module):
    def __init__(self, config: UNetConfig, block: int, *, attention: AttentionFunction, operations: Operations,
                 device: Any, dtype: torch.dtype | None):
        super().__init__()
        kw = dict(operations=operations, device=device, dtype=dtype)
        layers = [d for d in config.decoder_layers() if d.block == block]
        rev_out = list(reversed(config.block_out_channels))
        prev = rev_out[max(block - 1, 0)]
        out_c = rev_out[block]
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev if d.layer == 0 else out_c) + d.skip_channels, out_c, config.time_embed_dim,
                          groups=config.norm_num_groups, eps=config.norm_eps, **kw)
            for d in layers
        ])
        self.attentions = nn.ModuleList([
            Transformer2D(out_c, config.cross_attention_dim, d.heads, depth=d.depth, groups=config.norm_num_groups,
                          attention=attention, **kw)
            for d in layers
        ]) if config.up_block_types[block] == "CrossAttnUpBlock2D" else None
        self.upsamplers = (nn.ModuleList([Upsample2D(out_c, **kw)])
                           if block != len(config.up_block_types) - 1 else None)


class UNet2DCondition(SDEncoder):
    """The SD UNet; ``forward`` optionally runs XPSR's conditional attention."""

    def __init__(self, config: UNetConfig, *, attention: AttentionFunction = sdpa_attention,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__(config, None, attention=attention, operations=operations, device=device, dtype=dtype)
        self.config = config
        kw = dict(operations=operations, device=device, dtype=dtype)
        conv = dict(device=device, dtype=dtype)
        ch = config.block_out_channels
        self.up_blocks = nn.ModuleList([
            UpBlock(config, b, attention=attention, **kw) for b in range(len(config.up_block_types))
        ])
        self.conv_norm_out = operations.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps, **conv)
        self.conv_out = operations.Conv2d(ch[0], config.out_channels, 3, padding=1, **conv)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
                down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None,
                conditional_attention: ConditionalAttention | None = None) -> torch.Tensor:
        """Predicted noise (B, 4, h, w). XPSR passes the ControlNet residuals and its conditional attention.

        sample (B, 4, h, w); encoder_hidden_states c_h (B, 77, 768) (the UNet never sees c_l);
        ``down_residuals`` and ``mid_residual`` as ``SFAControlNet`` returns them.
        """
        if conditional_attention is not None and down_residuals is None:
            raise ValueError("the conditional attention needs the ControlNet residuals (down_residuals)")
        temb = self.time_embedding(timestep, sample)
        x, skips = self.encode(sample, temb, encoder_hidden_states)
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual

        layer = 0
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
                if block.attentions is not None:
                    x = block.attentions[i](x, encoder_hidden_states)
                if conditional_attention is not None:
                    x = conditional_attention(x, layer, down_residuals)
                layer += 1
            if block.upsamplers is not None:
                x = block.upsamplers[0](x, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(x)))
