"""Latent tiles for large images, blended with the official Gaussian weights.

The official pipeline denoises latents larger than tile x tile (320 x 320 latent px) in
square tiles overlapping by 8 px; at every step each tile gets its own ControlNet and UNet
pass, and the predictions are averaged with Gaussian weights. The weights' centre is
(T-1)/2 across but T/2 down, a quirk inherited from PASD/SeeSR that is kept so results
match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Box:
    """A tile's slice of the latent: rows y0:y1, columns x0:x1."""

    y0: int
    y1: int
    x0: int
    x1: int

    def scaled(self, factor: int) -> Box:
        return Box(self.y0 * factor, self.y1 * factor, self.x0 * factor, self.x1 * factor)


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


def gaussian_weights(size: int) -> torch.Tensor:
    """(size, size) blending weights of the official pipeline (float64, as it computes them)."""
    var = 0.01

    def probs(midpoint: float) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64)
        return torch.exp(-(x - midpoint) ** 2 / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(probs(size / 2), probs((size - 1) / 2))
