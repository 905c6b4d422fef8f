"""Image sizes and resampling as the official pipeline does them.

The official script works on PIL images: LR upscaled by the scale factor (bicubic), short
side raised to the processing size when smaller (bilinear), then rounded down to a
multiple of 8 (bicubic); the result is resized back to exactly LR size x scale at the
end. PyTorch's antialiased bicubic and bilinear use PIL's kernels, so tensors follow the
same path without a round trip through 8-bit images (``resize`` says what of 8 bits it keeps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
"""The image files every folder reader takes (pairs, captions, training, evaluation, upscale_folder), in lower case:
all PIL reads, so a dataset is the same set of images at every stage."""


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE batch (B, H, W, C) as 3 channels: alpha dropped, grayscale expanded."""
    if image.ndim != 4:
        raise ValueError(f"image has shape {tuple(image.shape)}; expected (batch, height, width, channels)")
    channels = image.shape[-1]
    if channels in (3, 4):
        return image[..., :3]
    if channels in (1, 2):
        return image[..., :1].expand(-1, -1, -1, 3)
    raise ValueError(f"image has {channels} channels; expected 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA)")


def resize(image: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize (B, C, H, W) in [0, 1] like PIL's BICUBIC / BILINEAR on an 8-bit image.

    PIL resamples horizontally first and stores that pass in 8 bits, so its overshoot at
    sharp edges is clipped before the vertical pass; clamping between the two passes
    reproduces that (the rounding to 8 bits is left out: the pipeline stays in float).
    """
    if image.shape[-2:] == (height, width):
        return image
    out = image.float()
    for size in ((out.shape[-2], width), (height, width)):
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    return out.to(image.dtype)


def processing_steps(height: int, width: int, scale: float, process_size: int) -> list[tuple[int, int, str]]:
    """The official sequence of resizes from LR to the size the diffusion runs at."""
    h, w = int(height * scale), int(width * scale)
    steps = [(h, w, "bicubic")]
    if min(h, w) < process_size:
        if h <= w:
            h, w = process_size, int(process_size * w / h)
        else:
            h, w = int(process_size * h / w), process_size
        steps.append((h, w, "bilinear"))
    steps.append((h // 8 * 8, w // 8 * 8, "bicubic"))
    return steps


def pipeline_bytes(batch: int, height: int, width: int, scale: float, process_size: int) -> int:
    """Host memory the pipeline's images need at their largest (float32), to refuse sizes that cannot fit.

    The processing-size image is held about four times (upscaled, decoded, colour-fixed,
    reference) and the output twice (resized, returned).
    """
    h, w, _ = processing_steps(height, width, scale, process_size)[-1]
    out_h, out_w = int(height * scale), int(width * scale)
    return 4 * batch * 3 * (4 * h * w + 2 * out_h * out_w)


def upscale_for_processing(lr: torch.Tensor, scale: float, process_size: int) -> torch.Tensor:
    """LR (B, C, H, W) resized to the processing size by the official sequence."""
    for h, w, mode in processing_steps(lr.shape[-2], lr.shape[-1], scale, process_size):
        lr = resize(lr, h, w, mode)
    return lr
