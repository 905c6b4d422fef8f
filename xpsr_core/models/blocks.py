"""Convolutional building blocks of the SD UNet and its ControlNet, in diffusers' key layout."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Recomputable
from .operations import Operations, default_operations


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: int = 0, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep features, as diffusers' ``get_timestep_embedding`` computes them."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the timestep through a two-layer MLP (diffusers' time_proj + time_embedding)."""

    def __init__(self, in_dim: int, dim: int, flip_sin_to_cos: bool, freq_shift: int, *,
                 operations: Operations = default_operations, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_dim, self.flip_sin_to_cos, self.freq_shift = in_dim, flip_sin_to_cos, freq_shift
        self.linear_1 = operations.Linear(in_dim, dim, device=device, dtype=dtype)
        self.linear_2 = operations.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        """One embedding per sample of ``sample``, from a scalar or per-sample timestep."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = (t[None] if t.ndim == 0 else t).expand(sample.shape[0])
        features = timestep_embedding(t, self.in_dim, self.flip_sin_to_cos, self.freq_shift).to(sample.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class ResnetBlock2D(Recomputable):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.output_scale_factor = output_scale_factor
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = operations.Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = operations.Linear(temb_channels, out_channels, **kw)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=eps, **kw)
        self.conv2 = operations.Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (operations.Conv2d(in_channels, out_channels, 1, **kw)
                              if in_channels != out_channels else None)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    def __init__(self, channels: int, *, operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int, *, operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsample to the size of the skip it meets, which is 2x except after odd encoder sizes."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))

