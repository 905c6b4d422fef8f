"""XPSR Tile Grid: the latent tiles XPSR Sampler will denoise an image in, as a grid and as image crops.

Its settings are XPSR Sampler's (the same inputs, made here), so the crops are the pixels
each tile's model call sees: caption them (XPSR Caption, or any captioner) and give the
captions to XPSR Dual Prompt Encode with the grid, and every tile gets its own prompts.
"""

from __future__ import annotations

import torch

from comfy_api.latest import io

from ..xpsr_core.pipeline.image import to_rgb, upscale_for_processing
from ..xpsr_core.pipeline.tiling import TileGrid, processing_tile_grid
from .common import CATEGORY, XPSRTileGridType


def scale_input() -> io.Float.Input:
    return io.Float.Input("scale", default=4.0, min=1.0, max=16.0, step=0.5,
                          tooltip="Output size = LR size x scale (official 4).")


def process_size_input() -> io.Int.Input:
    return io.Int.Input("process_size", default=512, min=64, max=4096, step=8,
                        tooltip="The upscaled image's short side is raised to at least this before diffusion "
                                "(official 512); the result is resized back to LR size x scale.")


def tile_size_input() -> io.Int.Input:
    return io.Int.Input("tile_size", default=320, min=8, max=4096, step=8,
                        tooltip="Latents with more than tile_size^2 pixels are denoised in overlapping square tiles "
                                "of this many latent pixels (official 320, i.e. 2560 px).")


def tile_overlap_input() -> io.Int.Input:
    return io.Int.Input("tile_overlap", default=8, min=0, max=512, step=1,
                        tooltip="Overlap of the latent tiles (official 8), blended with Gaussian weights.")


def check_tile_settings(tile_size: int, tile_overlap: int) -> None:
    if tile_overlap >= tile_size:
        raise ValueError(f"tile_overlap is {tile_overlap}; expected less than tile_size ({tile_size})")


def tile_crops(lr: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """The grid's tiles of the processed image, (B * tiles, t, t, C) image-major (image b's tile k is row
    b * tiles + k), from the LR IMAGE (B, H, W, C)."""
    processed = upscale_for_processing(lr.movedim(-1, 1).float(), grid.scale, grid.process_size)
    return torch.cat([processed[b:b + 1][box.slices] for b in range(processed.shape[0])
                      for box in grid.boxes]).movedim(1, -1)


class XPSRTileGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRTileGrid",
            display_name="XPSR Tile Grid",
            category=CATEGORY,
            description="The latent tiles XPSR Sampler will denoise an image in, for per-tile prompts: give it the "
                        "sampler's scale, process_size, tile_size and tile_overlap. Caption the tiles (XPSR Caption "
                        "or any captioner) and pass the captions and the grid to XPSR Dual Prompt Encode; each tile "
                        "then gets its own prompts (one caption pair per tile).",
            inputs=[
                io.Image.Input("image", tooltip="The low-resolution image(s), as given to XPSR Sampler."),
                scale_input(), process_size_input(), tile_size_input(), tile_overlap_input(),
            ],
            outputs=[
                XPSRTileGridType.Output(display_name="tile_grid",
                                        tooltip="For XPSR Dual Prompt Encode's tile_grid (and XPSR Caption's)."),
                io.Image.Output(display_name="tiles",
                                tooltip="Each tile of the upscaled image as XPSR Sampler's model calls see it, image "
                                        "by image, in the grid's order (column by column: top to bottom, then left "
                                        "to right): caption these for per-tile prompts."),
                io.Int.Output(display_name="tile_count", tooltip="Tiles per image; 1 when the image is not tiled."),
            ],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, scale: float, process_size: int, tile_size: int,
                tile_overlap: int) -> io.NodeOutput:
        check_tile_settings(tile_size, tile_overlap)
        rgb = to_rgb(image)
        grid = processing_tile_grid(rgb.shape[1], rgb.shape[2], scale, process_size, tile_size, tile_overlap,
                                    rgb.shape[0])
        return io.NodeOutput(grid, tile_crops(rgb, grid), grid.count)
