"""Image-quality metrics of the paper's tables.

PSNR and SSIM are computed here on the Y channel, as super-resolution papers (and basicsr,
which XPSR's evaluation used) compute them. The learned metrics (LPIPS, DISTS, NIQE, MUSIQ,
MANIQA, CLIP-IQA, FID) come from pyiqa when it is installed and its weights are on disk;
nothing is ever downloaded, and a metric that cannot run is reported with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import first_line

FULL_REFERENCE = ("lpips", "dists")
NO_REFERENCE = ("niqe", "musiq", "maniqa", "clipiqa")
LEARNED = FULL_REFERENCE + NO_REFERENCE
LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid"}


def rgb_to_y(image: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma in [16, 235] of (B, 3, H, W) RGB in [0, 1], as basicsr's rgb2ycbcr(y_only=True)."""
    weights = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64, device=image.device)
    return (image.double().movedim(1, -1) @ weights + 16.0)[:, None]


def _crop(image: torch.Tensor, border: int) -> torch.Tensor:
    return image[..., border:-border, border:-border] if border else image


def psnr_y(prediction: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """PSNR (dB) on the Y channel, per image, with data range 255."""
    pred, ref = (_crop(rgb_to_y(x), crop_border) for x in (prediction, target))
    mse = ((pred - ref) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_y(prediction: torch.Tensor, target: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """SSIM on the Y channel, per image: 11x11 Gaussian window (sigma 1.5), valid region, data range 255."""
    pred, ref = (_crop(rgb_to_y(x), crop_border) for x in (prediction, target))
    g = _gaussian_window().to(pred.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, g[None, None, :, None]), g[None, None, None, :])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_p, mu_r = blur(pred), blur(ref)
    var_p = blur(pred * pred) - mu_p ** 2
    var_r = blur(ref * ref) - mu_r ** 2
    cov = blur(pred * ref) - mu_p * mu_r
    ssim = ((2 * mu_p * mu_r + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_r ** 2 + c1) * (var_p + var_r + c2))
    return ssim.mean(dim=(1, 2, 3))


@dataclass
class Unavailable:
    """Why a metric could not be computed (library or weights missing)."""

    reason: str


def learned_metric(name: str, device: str, weights: str | None) -> Callable | Unavailable:
    """A pyiqa metric from local weights, or the reason it cannot run offline."""
    try:
        import pyiqa
    except ImportError:
        return Unavailable("pyiqa is not installed (pip install pyiqa)")
    options = {"pretrained_model_path": weights} if weights else {}
    try:
        return pyiqa.create_metric(name, device=device, as_loss=False, **options)
    except Exception as e:  # pyiqa raises network and file errors of many types when weights are absent
        return Unavailable(f"its weights are not available offline ({type(e).__name__}: {first_line(e)}); pass "
                           f"--weights {name}=<path>")

