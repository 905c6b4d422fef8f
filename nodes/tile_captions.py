"""Captions per latent tile: the tiles XPSR Sampler will denoise, captioned in one batched pass.

A captioner is anything that turns pictures into rows of captions, one per instruction
(XPSR MLLM Loader's model, or a ComfyUI CLIP that generates text); the tiles are cut from
the processed image by the tile grid (``tile_crops``), so each caption describes the pixels
its tile's model calls see.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ..xpsr_core.pipeline.image import to_rgb
from ..xpsr_core.pipeline.tiling import TileGrid, processing_tile_grid
from .tile_grid import tile_crops

Captioner = Callable[[list[Image.Image]], list[list[str]]]
"""Pictures in, one row of captions (one per instruction) per picture out."""


def check_grid_fits(image: torch.Tensor, grid: TileGrid) -> None:
    """Refuse a grid made for another image size or batch than ``image`` (B, H, W, C)."""
    own = processing_tile_grid(image.shape[1], image.shape[2], grid.scale, grid.process_size, grid.tile,
                               grid.overlap, image.shape[0])
    if not own.same_tiles(grid) or own.images != grid.images:
        raise ValueError(f"tile_grid is {grid.describe()} for {grid.images} image(s), but image ({image.shape[0]} "
                         f"image(s) of {image.shape[2]}x{image.shape[1]} px) gives {own.describe()}; make the grid "
                         "with XPSR Tile Grid from this image")


def caption_tiles(captioner: Captioner, to_picture: Callable[[torch.Tensor], Image.Image], image: torch.Tensor,
                  grid: TileGrid, whole_image_context: bool) -> list[list[str]]:
    """Every tile's row of captions, image by image in the grid's order; with ``whole_image_context`` each row's
    captions follow their image's own whole-image captions (the images are captioned in the same pass)."""
    rgb = to_rgb(image)
    check_grid_fits(rgb, grid)
    pictures = [to_picture(tile) for tile in tile_crops(rgb, grid)]
    if whole_image_context:
        pictures += [to_picture(whole) for whole in rgb]
    rows = captioner(pictures)
    tiles, wholes = rows[:len(rgb) * grid.count], rows[len(rgb) * grid.count:]
    if not whole_image_context:
        return tiles
    return [[f"{whole} {tile}".strip() for whole, tile in zip(wholes[k // grid.count], row, strict=True)]
            for k, row in enumerate(tiles)]
