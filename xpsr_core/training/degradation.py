"""Real-ESRGAN's second-order degradation, as the official XPSR data script makes its training pairs.

XPSR's ``utils_data/make_train.py`` runs basicsr 1.4.2's RealESRGANDataset (kernels drawn per
image) and a copy of RealESRGANModel's degradation (blur, resize, noise, JPEG, twice, then the
final resize + sinc filter and JPEG in random order). basicsr no longer imports with current
torchvision and needs OpenCV, so the pipeline is rewritten here on torch and Pillow with
basicsr's formulas. Two things cannot be bit-identical: JPEG goes through Pillow's libjpeg
encoder (basicsr uses its own DiffJPEG in torch), and the random numbers come from one
``torch.Generator`` instead of Python's, NumPy's and torch's global streams.

As in basicsr, choices that change tensor sizes or the order of operations (resize factor and
mode, noise type, whether the second blur and which final order) are drawn once per batch;
kernels, noise levels, gray-noise flags and JPEG qualities are drawn per image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

T = TypeVar("T")

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

# USMSharp as make_train builds it: radius 50 (made odd: 51), sigma 0, weight 0.5, threshold 10.
USM_RADIUS = 51
USM_WEIGHT = 0.5
USM_THRESHOLD = 10.0


@dataclass(frozen=True)
class KernelConfig:
    """One stage's random blur kernel, in basicsr's option names."""

    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        if len(self.kernel_prob) != len(KERNEL_TYPES):
            raise ValueError(f"kernel_prob has {len(self.kernel_prob)} entries; expected one per kernel type "
                             f"({', '.join(KERNEL_TYPES)})")


@dataclass(frozen=True)
class DegradationConfig:
    """The official make_train settings (sf = 4), in basicsr's option names.

    ``kernel_sizes`` is basicsr's hard-coded ``kernel_range``: it serves both stages and the final
    sinc filter. The ``blur_kernel_size`` (21) and ``blur_kernel_size2`` (11) options of the
    official script are read by basicsr but never used, so they have no field here.
    """

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel1: KernelConfig = field(default_factory=KernelConfig)
    kernel2: KernelConfig = field(default_factory=lambda: KernelConfig(blur_sigma=(0.2, 1.5)))
    final_sinc_prob: float = 0.8
    # first degradation
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma in 0..255 units
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale is {self.scale}; expected a positive integer")


# --- random draws, all from the caller's generator ------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float, n: int | None = None) -> torch.Tensor:
    u = torch.rand(() if n is None else (n,), generator=generator, dtype=torch.float64)
    return low + (high - low) * u


def _chance(generator: torch.Generator, p: float) -> bool:
    return bool(torch.rand((), generator=generator, dtype=torch.float64) < p)


def _pick(generator: torch.Generator, probs: Sequence[float]) -> int:
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator))


def _choose(generator: torch.Generator, options: Sequence[T]) -> T:
    return options[int(torch.randint(len(options), (), generator=generator))]


# --- kernels ---------------------------------------------------------------------------------------------------


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """x^T Sigma^-1 x on basicsr's centred grid, Sigma = U diag(sx^2, sy^2) U^T, U the rotation by theta."""
    ax = torch.arange(-size // 2 + 1, size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    grid = torch.stack([xx, yy], dim=-1)
    c, s = math.cos(theta), math.sin(theta)
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = u @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ u.T
    return ((grid @ torch.linalg.inv(sigma)) * grid).sum(-1)


def blur_kernel(kind: str, size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0,
                beta: float = 1.0) -> torch.Tensor:
    """basicsr's Gaussian, generalized Gaussian and plateau kernels (float64, sum 1).

    The ``*_iso`` kinds use ``sigma_x`` alone, as basicsr does; ``beta`` shapes the generalized
    Gaussian exp(-0.5 q^beta) and the plateau 1 / (1 + q^beta), q = x^T Sigma^-1 x.
    """
    if kind not in KERNEL_TYPES:
        raise ValueError(f"kernel type {kind!r} is unknown; expected one of {', '.join(KERNEL_TYPES)}")
    if size % 2 != 1:
        raise ValueError(f"kernel size {size} is even; expected an odd size")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    elif sigma_y is None:
        raise ValueError(f"kernel type {kind!r} needs sigma_y")
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind in ("iso", "aniso"):
        kernel = torch.exp(-0.5 * q)
    elif kind.startswith("generalized"):
        kernel = torch.exp(-0.5 * q.pow(beta))
    else:
        kernel = 1 / (q.pow(beta) + 1)
    return kernel / kernel.sum()


def sinc_kernel(cutoff: float, size: int) -> torch.Tensor:
    """basicsr's circular low-pass filter: cutoff J1(cutoff r) / (2 pi r), centre cutoff^2 / (4 pi), sum 1."""
    if size % 2 != 1:
        raise ValueError(f"kernel size {size} is even; expected an odd size")
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r = torch.sqrt(ax[:, None] ** 2 + ax[None, :] ** 2)
    centre = (size - 1) // 2
    r[centre, centre] = 1.0  # placeholder, overwritten below: avoids 0 / 0
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    kernel[centre, centre] = cutoff**2 / (4 * math.pi)
    return kernel / kernel.sum()


def _beta(generator: torch.Generator, beta_range: tuple[float, float]) -> float:
    # basicsr: half the draws below 1, half above, whatever the range's width on each side.
    if _chance(generator, 0.5):
        return float(_uniform(generator, beta_range[0], 1.0))
    return float(_uniform(generator, 1.0, beta_range[1]))


def random_kernel(config: KernelConfig, sizes: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """One stage's kernel as RealESRGANDataset draws it: a size, then a sinc filter or a mixed kernel."""
    size = _choose(generator, sizes)
    if _chance(generator, config.sinc_prob):
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(float(_uniform(generator, low, math.pi)), size)
    kind = KERNEL_TYPES[_pick(generator, config.kernel_prob)]
    sigma_x = float(_uniform(generator, *config.blur_sigma))
    sigma_y, theta = sigma_x, 0.0
    if "aniso" in kind:
        sigma_y = float(_uniform(generator, *config.blur_sigma))
        theta = float(_uniform(generator, -math.pi, math.pi))
    beta = 1.0
    if kind.startswith("generalized"):
        beta = _beta(generator, config.betag_range)
    elif kind.startswith("plateau"):
        beta = _beta(generator, config.betap_range)
    return blur_kernel(kind, size, sigma_x, sigma_y, theta, beta)


def random_final_sinc(config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """The final sinc filter, or the 1x1 identity when not drawn (basicsr's pulse kernel).

    Its size is drawn from ``kernel_sizes`` like the blur kernels'; basicsr pads it to 21, which
    changes nothing.
    """
    if not _chance(generator, config.final_sinc_prob):
        return torch.ones(1, 1, dtype=torch.float64)
    size = _choose(generator, config.kernel_sizes)
    return sinc_kernel(float(_uniform(generator, math.pi / 3, math.pi)), size)


def filter2d(image: torch.Tensor, kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each image of (B, C, H, W) correlated with its own odd kernel, reflect-padded like basicsr's filter2D.

    Kernels of different sizes are zero-padded to the largest; that changes nothing, as basicsr's
    padding of every kernel to 21 changes nothing.
    """
    b, c, h, w = image.shape
    if len(kernels) != b:
        raise ValueError(f"{len(kernels)} kernels for a batch of {b}; expected one per image")
    k = max(kernel.shape[-1] for kernel in kernels)
    padded = torch.stack([F.pad(kernel, [(k - kernel.shape[-1]) // 2] * 4) for kernel in kernels])
    weight = padded.to(image).repeat_interleave(c, dim=0)[:, None]
    x = F.pad(image, [k // 2] * 4, mode="reflect").reshape(1, b * c, h + k - 1, w + k - 1)
    return F.conv2d(x, weight, groups=b * c).reshape(b, c, h, w)


# --- USM sharpening ----------------------------------------------------------------------------------------------


def _usm_gaussian(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # cv2.getGaussianKernel(51, 0): sigma derived from the size, 0.3 * ((ksize - 1) / 2 - 1) + 0.8 = 8.
    sigma = 0.3 * ((USM_RADIUS - 1) * 0.5 - 1) + 0.8
    x = torch.arange(USM_RADIUS, dtype=torch.float64) - (USM_RADIUS - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _usm_blur(image: torch.Tensor) -> torch.Tensor:
    # basicsr convolves with the 51x51 outer product; two 1-D passes over the same reflect padding give the same
    # result about 25 times faster.
    b, c, h, w = image.shape
    g = _usm_gaussian(image.dtype, image.device)
    pad = USM_RADIUS // 2
    x = F.pad(image, [pad] * 4, mode="reflect").reshape(b * c, 1, h + 2 * pad, w + 2 * pad)
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


def usm_sharp(image: torch.Tensor) -> torch.Tensor:
    """basicsr's USMSharp: sharpen where the detail exceeds the threshold, with a soft mask.

    The official script sharpens the GT before degrading it and saves the sharpened GT as HR,
    so the model learns to produce sharpened images.
    """
    residual = image - _usm_blur(image)
    mask = (residual.abs() * 255 > USM_THRESHOLD).to(image.dtype)
    soft_mask = _usm_blur(mask)
    sharp = (image + USM_WEIGHT * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


# --- noise and JPEG ---------------------------------------------------------------------------------------------


def add_gaussian_noise(image: torch.Tensor, sigma_range: tuple[float, float], gray_prob: float,
                       generator: torch.Generator) -> torch.Tensor:
    """basicsr's random_add_gaussian_noise_pt: per image a sigma (0..255 units) and, with ``gray_prob``,
    one noise shared by the three channels; clipped, not rounded."""
    b, _, h, w = image.shape
    sigma = _uniform(generator, *sigma_range, b).to(image).view(b, 1, 1, 1) / 255
    gray = (torch.rand(b, generator=generator, dtype=torch.float64) < gray_prob).view(b, 1, 1, 1)
    color_noise = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    gray_noise = torch.randn((b, 1, h, w), generator=generator, dtype=image.dtype)
    noise = torch.where(gray, gray_noise, color_noise).to(image.device) * sigma
    return (image + noise).clamp(0, 1)


def _poisson_noise(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # basicsr: count the 8-bit levels of each image; photons per unit = that count rounded up to a power of two.
    image = (image * 255).round().clamp(0, 255) / 255
    levels = [len(torch.unique(x)) for x in image]
    vals = image.new_tensor([2.0 ** math.ceil(math.log2(n)) for n in levels]).view(-1, 1, 1, 1)
    counts = torch.poisson((image * vals).cpu(), generator=generator).to(image.device)
    return counts / vals - image


def add_poisson_noise(image: torch.Tensor, scale_range: tuple[float, float], gray_prob: float,
                      generator: torch.Generator) -> torch.Tensor:
    """basicsr's random_add_poisson_noise_pt: shot noise of the rounded image (or of its luma, with
    ``gray_prob``), times a per-image scale, added to the unrounded image and clipped."""
    b = image.shape[0]
    scale = _uniform(generator, *scale_range, b).to(image).view(b, 1, 1, 1)
    gray = (torch.rand(b, generator=generator, dtype=torch.float64) < gray_prob).view(b, 1, 1, 1).to(image.device)
    color_noise = _poisson_noise(image, generator)
    luma = (0.2989 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3])  # torchvision's rgb_to_grayscale
    gray_noise = _poisson_noise(luma, generator).expand_as(image)
    return (image + torch.where(gray, gray_noise, color_noise) * scale).clamp(0, 1)


def jpeg(image: torch.Tensor, qualities: Sequence[int]) -> torch.Tensor:
    """Each image of (B, 3, H, W) through an 8-bit JPEG round trip (libjpeg via Pillow, 4:2:0 chroma as DiffJPEG)."""
    if len(qualities) != image.shape[0]:
        raise ValueError(f"{len(qualities)} qualities for a batch of {image.shape[0]}; expected one per image")
    pixels = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array, quality in zip(pixels, qualities, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=int(quality),
                                                          subsampling="4:2:0")
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(image) / 255


def _random_jpeg(image: torch.Tensor, quality_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    # basicsr draws a float quality for DiffJPEG; libjpeg takes an integer, so the draw is rounded.
    qualities = _uniform(generator, *quality_range, image.shape[0]).round().int().tolist()
    return jpeg(image.clamp(0, 1), qualities)


# --- the pipeline -------------------------------------------------------------------------------------------------


def _resize_factor(generator: torch.Generator, probs: tuple[float, float, float], factor_range: tuple[float, float]
                   ) -> float:
    updown = _pick(generator, probs)
    if updown == 0:
        return float(_uniform(generator, 1.0, factor_range[1]))
    if updown == 1:
        return float(_uniform(generator, factor_range[0], 1.0))
    return 1.0


def _interpolate(image: torch.Tensor, generator: torch.Generator, size: tuple[int, int] | None = None,
                 scale_factor: float | None = None) -> torch.Tensor:
    mode = _choose(generator, RESIZE_MODES)
    return F.interpolate(image, size=size, scale_factor=scale_factor, mode=mode,
                         align_corners=None if mode == "area" else False)


def _random_noise(image: torch.Tensor, generator: torch.Generator, gaussian_prob: float,
                  sigma_range: tuple[float, float], poisson_range: tuple[float, float], gray_prob: float
                  ) -> torch.Tensor:
    if _chance(generator, gaussian_prob):
        return add_gaussian_noise(image, sigma_range, gray_prob, generator)
    return add_poisson_noise(image, poisson_range, gray_prob, generator)


def minimum_size(config: DegradationConfig) -> int:
    """The smallest HR side (a multiple of the scale) whose every blur input still fits basicsr's reflect padding.

    The first resize can shrink the image by ``resize_range[0]`` before the second blur, and the
    final sinc filter runs on the LR image; reflect padding needs both wider than half a kernel.
    """
    half = max(config.kernel_sizes) // 2
    n = config.scale
    while (int(n * config.resize_range[0]) <= half or n // config.scale <= half
           or int(n / config.scale * config.resize_range2[0]) < 1):
        n += config.scale
    return n


def degrade(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """An HR batch (B, 3, H, W in [0, 1]) to its LR (B, 3, H / scale, W / scale), in 8-bit levels.

    The HR is degraded as given: the official script sharpens it first (``usm_sharp``), which
    ``make_pair`` does. The same generator state gives the same LR.
    """
    if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(f"HR batch is {tuple(hr.shape)} {hr.dtype}; expected float (batch, 3, height, width)")
    b, _, h, w = hr.shape
    least = minimum_size(config)
    if h % config.scale or w % config.scale or min(h, w) < least:
        raise ValueError(f"HR batch is {h}x{w} (height x width); expected sides that are multiples of the scale "
                         f"{config.scale} and at least {least}")
    kernels1 = [random_kernel(config.kernel1, config.kernel_sizes, generator) for _ in range(b)]
    kernels2 = [random_kernel(config.kernel2, config.kernel_sizes, generator) for _ in range(b)]
    sincs = [random_final_sinc(config, generator) for _ in range(b)]

    # first degradation
    out = filter2d(hr, kernels1)
    out = _interpolate(out, generator, scale_factor=_resize_factor(generator, config.resize_prob, config.resize_range))
    out = _random_noise(out, generator, config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range,
                        config.gray_noise_prob)
    out = _random_jpeg(out, config.jpeg_range, generator)

    # second degradation
    if _chance(generator, config.second_blur_prob):
        out = filter2d(out, kernels2)
    factor = _resize_factor(generator, config.resize_prob2, config.resize_range2)
    out = _interpolate(out, generator, size=(int(h / config.scale * factor), int(w / config.scale * factor)))
    out = _random_noise(out, generator, config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2,
                        config.gray_noise_prob2)

    # final: [resize back + sinc] and JPEG, in either order (other orders give twisted lines, per Real-ESRGAN)
    lr_size = (h // config.scale, w // config.scale)
    if _chance(generator, 0.5):
        out = filter2d(_interpolate(out, generator, size=lr_size), sincs)
        out = _random_jpeg(out, config.jpeg_range2, generator)
    else:
        out = _random_jpeg(out, config.jpeg_range2, generator)
        out = filter2d(_interpolate(out, generator, size=lr_size), sincs)
    # RealESRGANModel rounds to 8-bit levels here; XPSR's make_train only clamps and rounds when it writes the PNG
    # after upsampling. Rounding first keeps the LR what an 8-bit LR file would hold.
    return (out * 255).round().clamp(0, 255) / 255


def make_pair(image: torch.Tensor, size: int, config: DegradationConfig, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair from an HR image (3, H, W in [0, 1]) as make_train writes it: (HR, LR), both (3, size, size).

    Like RealESRGANDataset + make_train: random horizontal flip, random size x size crop, USM
    sharpening (the sharpened crop is the HR that gets saved), degradation, and the LR
    bicubic-upsampled back to the crop size (clamped, as the 8-bit PNG write clamps).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image is {tuple(image.shape)}; expected (3, height, width)")
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"image is {w}x{h} (width x height); expected at least {size}x{size}")
    if _chance(generator, 0.5):
        image = image.flip(-1)
    top = int(torch.randint(h - size + 1, (), generator=generator))
    left = int(torch.randint(w - size + 1, (), generator=generator))
    hr = usm_sharp(image[None, :, top:top + size, left:left + size].float())
    lr = degrade(hr, config, generator)
    lr = F.interpolate(lr, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return hr[0], lr[0]
