"""Per-tile prompts: conditioning whose c_h and c_l change from one of XPSR Sampler's latent tiles to the next.

XPSR Dual Prompt Encode, given a tile grid (XPSR Tile Grid), encodes one prompt pair per
tile and keeps every tile's embeddings in the conditioning entry under ``TILE_PROMPTS_KEY``;
the entry's own tensors are tile 0's, so the entry stays ordinary CONDITIONING. XPSR Sampler
refuses, before sampling, per-tile prompts made for another grid than its own, and its tiler
gives each tile's model call that tile's rows. Nothing else samples them: XPSR Apply refuses
them, since ComfyUI's samplers would give every tile tile 0's prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

import comfy.conds
import comfy.utils

from ..xpsr_core.pipeline.tiling import LATENT_FACTOR, Box, TileGrid
from .common import LOWLEVEL_KEY

TILE_PROMPTS_KEY = "xpsr_tile_prompts"


@dataclass(frozen=True)
class TilePrompts:
    """Every tile's embeddings, (tiles, B, tokens, dim) with B one or the image batch; None where every tile has the
    entry's own."""

    grid: TileGrid
    crossattn: torch.Tensor | None
    lowlevel: torch.Tensor | None

    def for_tiles(self, cond: dict, indices: Sequence[int], batch: int) -> dict:
        """A processed cond (ComfyUI's sampler's dict) for a model call on tiles ``indices`` of ``batch`` images,
        their rows stacked tile-major as the latent tiles are (row i * batch + b: image b's tile indices[i])."""
        model_conds = dict(cond["model_conds"])
        for key, per_tile in (("c_crossattn", self.crossattn), (LOWLEVEL_KEY, self.lowlevel)):
            if per_tile is not None:
                model_conds[key] = comfy.conds.CONDCrossAttn(torch.cat(
                    [comfy.utils.repeat_to_batch_size(per_tile[i], batch) for i in indices]))
        return {k: v for k, v in cond.items() if k != TILE_PROMPTS_KEY} | {"model_conds": model_conds}


def allowed_counts(grid: TileGrid) -> tuple[int, ...]:
    """How many prompts a list may hold with ``grid``: one for every tile, one per tile, or one per tile of each
    image (image-major: image b's tile t is prompt b * tiles + t)."""
    return tuple(dict.fromkeys((1, grid.count, grid.count * grid.images) if grid.images == 1
                               else (1, grid.count * grid.images)))


def _by_tile(rows: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B * tiles, ...) image-major rows as (tiles, B, ...)."""
    return rows.reshape(rows.shape[0] // tiles, tiles, *rows.shape[1:]).transpose(0, 1)


def split_by_tile(conditioning: list, grid: TileGrid) -> list:
    """Conditioning encoded from per-tile prompt lists (rows image-major, ``allowed_counts``) as per-tile
    conditioning: each entry's tensors become tile 0's, and all tiles' go under ``TILE_PROMPTS_KEY``."""
    out = []
    for cond, extra in conditioning:
        lowlevel = extra["model_conds"][LOWLEVEL_KEY].cond
        crossattn, lowlevel = _by_tile(cond, grid.count), _by_tile(lowlevel, grid.count)
        pooled = extra.get("pooled_output")
        out.append([crossattn[0], {
            **extra, TILE_PROMPTS_KEY: TilePrompts(grid, crossattn, lowlevel),
            "model_conds": {**extra["model_conds"], LOWLEVEL_KEY: comfy.conds.CONDCrossAttn(lowlevel[0])},
            **({"pooled_output": _by_tile(pooled, grid.count)[0]} if pooled is not None else {})}])
    return out


def tile_prompts_of(conditioning: list) -> list[TilePrompts]:
    return [extra[TILE_PROMPTS_KEY] for _, extra in conditioning if TILE_PROMPTS_KEY in extra]


def check_tile_prompts(grid: TileGrid, **conditionings: list) -> None:
    """Refuse per-tile prompts made for another grid than the one the sampler will denoise (``grid``)."""
    for name, conditioning in conditionings.items():
        for tiles in tile_prompts_of(conditioning):
            if not tiles.grid.same_tiles(grid):
                raise ValueError(f"{name} conditioning has per-tile prompts for {tiles.grid.describe()}, but XPSR "
                                 f"Sampler will denoise {grid.describe()}; give XPSR Tile Grid the sampler's scale, "
                                 "process_size, tile_size and tile_overlap")


def refuse_tile_prompts(node: str, **conditionings: list) -> None:
    """For nodes whose sampling cannot give each tile its own prompts."""
    for name, conditioning in conditionings.items():
        if tile_prompts_of(conditioning):
            raise ValueError(f"{name} conditioning has per-tile prompts (from XPSR Dual Prompt Encode's tile_grid); "
                             f"{node} would give every tile the first tile's prompts. Sample them with XPSR Sampler, "
                             "or encode the prompts without a tile grid")


def tile_indices(grid: TileGrid, latent_boxes: Sequence[Box], group: Sequence[Box]) -> list[int]:
    """The grid's indices of the tiler's ``group`` of tiles, refusing a grid that is not the tiler's own."""
    if tuple(b.scaled(LATENT_FACTOR) for b in latent_boxes) != grid.boxes:
        raise ValueError(f"the conditioning has per-tile prompts for {grid.describe()}, but the sampler denoises "
                         f"{len(latent_boxes)} latent tiles {[(b.x0, b.y0, b.x1, b.y1) for b in latent_boxes]}; "
                         "give XPSR Tile Grid the sampler's settings")
    return [latent_boxes.index(box) for box in group]
