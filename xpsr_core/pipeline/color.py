"""Colour fix: give the restored image the LR image's colours.

Diffusion drifts colours; the official test script always applies AdaIN against the
upscaled LR image. The wavelet fix (keep the result's high frequencies, take the LR
image's low frequencies) ships in the official code too, unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet")
"""The colour fixes, adain the official one: what XPSR Color Fix offers."""
COLOR_FIX_CHOICES = (*COLOR_FIXES, "none")
"""What color_fix and XPSR Sampler's color_fix take: a fix, or none."""


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std of ``reference`` on ``image`` (B, C, H, W in [0, 1]), clamped."""
    mean, std = _mean_std(image)
    ref_mean, ref_std = _mean_std(reference)
    return ((image - mean) / std * ref_std + ref_mean).clamp(0, 1)


def _wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel, groups=x.shape[1], dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _wavelet_blur(x, 2 ** i)
        high += x - low
        x = low
    return high, x


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """High frequencies of ``image`` over the low frequencies of ``reference``, clamped."""
    high, _ = _wavelet_split(image)
    _, low = _wavelet_split(reference)
    return (high + low).clamp(0, 1)


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "none":
        return image
    raise ValueError(f"colour fix is {method!r}; expected one of {COLOR_FIX_CHOICES}")
