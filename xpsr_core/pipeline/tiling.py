"""Latent tiles for large images, blended with the official Gaussian weights.

The official pipeline denoises latents larger than tile x tile (320 x 320 latent px) in
square tiles overlapping by 8 px; at every step each tile gets its own ControlNet and UNet
pass, and the predictions are averaged with Gaussian weights. The weights' centre is
(T-1)/2 across but T/2 down, a quirk inherited from PASD/SeeSR that is kept so results
match.

A ``TileGrid`` places those tiles in the processed image (the LR image resized to the size
the diffusion runs at), so that a captioner cuts the tiles the sampler will denoise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .image import processing_steps

LATENT_FACTOR = 8
"""Image pixels per latent pixel (SD1.5's VAE)."""


@dataclass(frozen=True)
class Box:
    """A tile's slice of the latent: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    def scaled(self, factor: int) -> Box:
        return Box(self.y0 * factor, self.y1 * factor, self.x0 * factor, self.x1 * factor)

    @property
    def slices(self) -> tuple:
        """The index of this tile in a tensor (..., H, W): ``x[box.slices]`` is (..., y1 - y0, x1 - x0)."""
        return (..., slice(self.y0, self.y1), slice(self.x0, self.x1))


def needs_tiling(height: int, width: int, tile: int) -> bool:
    """The official rule: tile only when the latent has more than tile^2 pixels."""
    return height * width > tile * tile


def _offsets(length: int, tile: int, overlap: int) -> list[int]:
    count = 1
    while (count - 1) * (tile - overlap) + tile < length:
        count += 1
    return [i * (tile - overlap) for i in range(count - 1)] + [length - tile]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """The official tile grid: a square tile of min(tile, h, w), the last row/column snapped to the edge."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap is {overlap}; expected at least 0 and less than the tile size {tile}")
    tile = min(tile, height, width)
    overlap = min(overlap, tile - 1)
    return [Box(y, y + tile, x, x + tile)
            for x in _offsets(width, tile, overlap) for y in _offsets(height, tile, overlap)]


@dataclass(frozen=True)
class TileGrid:
    """The tiles XPSR Sampler denoises an image in, as boxes in pixels of the processed image (height x width).

    ``scale`` and ``process_size`` make the processed image from the LR one; ``tile`` and
    ``overlap`` are the sampler's latent sizes; an image that is not tiled is one box
    covering it. ``images`` is the batch the grid was made for. The boxes come in the
    official order, column by column: top to bottom, then left to right.
    """

    height: int
    width: int
    scale: float
    process_size: int
    tile: int
    overlap: int
    boxes: tuple[Box, ...]
    images: int = 1

    @property
    def count(self) -> int:
        return len(self.boxes)

    def same_tiles(self, other: TileGrid) -> bool:
        return (self.height, self.width, self.boxes) == (other.height, other.width, other.boxes)

    def describe(self) -> str:
        """The grid in words, for errors that name two grids."""
        if self.count == 1:
            return (f"one tile, the whole {self.width}x{self.height} px processed image (tile_size {self.tile} "
                    f"latent px)")
        side = self.boxes[0].y1 - self.boxes[0].y0
        columns, rows = len({b.x0 for b in self.boxes}), len({b.y0 for b in self.boxes})
        return (f"{columns}x{rows} tiles of {side} px over a {self.width}x{self.height} px processed image "
                f"(tile_size {self.tile}, tile_overlap {self.overlap} latent px)")


def processing_tile_grid(lr_height: int, lr_width: int, scale: float, process_size: int, tile: int, overlap: int,
                         images: int = 1) -> TileGrid:
    """The grid XPSR Sampler uses for an LR image of lr_height x lr_width with these settings.

    The sampler's tiler cuts the latent of the processed image with ``tile_boxes``; this is
    the same call on that latent's size, scaled to image pixels. Captioners cut tiles with it.
    """
    height, width, _ = processing_steps(lr_height, lr_width, scale, process_size)[-1]
    latent_height, latent_width = height // LATENT_FACTOR, width // LATENT_FACTOR
    boxes = (tile_boxes(latent_height, latent_width, tile, overlap) if needs_tiling(latent_height, latent_width, tile)
             else [Box(0, latent_height, 0, latent_width)])
    return TileGrid(height, width, scale, process_size, tile, overlap, tuple(b.scaled(LATENT_FACTOR) for b in boxes),
                    images)


def gaussian_weights(size: int) -> torch.Tensor:
    """(size, size) blending weights of the official pipeline (float64, as it computes them)."""
    var = 0.01

    def probs(midpoint: float) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64)
        return torch.exp(-(x - midpoint) ** 2 / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(probs(size / 2), probs((size - 1) / 2))


def stack_tiles(x: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """The tiles of ``x`` (B, C, H, W) as one batch (len(boxes) * B, C, t, t), tile-major: row i * B + b is image b's
    tile i, so one model call denoises them all."""
    return torch.cat([x[box.slices] for box in boxes])


class GaussianBlend:
    """The official blending of tile predictions: per pixel, sum of weight * prediction over the tiles covering it,
    divided by the sum of their weights (``gaussian_weights``, so each tile counts most at its centre).

    One running sum per output (e.g. one per CFG branch), all over the same tiles.
    """

    def __init__(self, like: torch.Tensor, outputs: int, tile: int):
        self.weights = gaussian_weights(tile).to(like)
        self.sums = [torch.zeros_like(like) for _ in range(outputs)]
        self.weight_sum = torch.zeros(like.shape[-2:], dtype=like.dtype, device=like.device)

    def add(self, boxes: Sequence[Box], predictions: Sequence[torch.Tensor]) -> None:
        """Add one prediction per output, each the boxes' tiles stacked as ``stack_tiles`` stacks them."""
        for out, stacked in zip(self.sums, predictions, strict=True):
            for box, prediction in zip(boxes, stacked.chunk(len(boxes)), strict=True):
                out[box.slices] += prediction * self.weights
        for box in boxes:
            self.weight_sum[box.slices] += self.weights

    def result(self) -> list[torch.Tensor]:
        """The blended outputs, each the shape of ``like``."""
        return [out / self.weight_sum for out in self.sums]
