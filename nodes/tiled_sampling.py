"""Latent tiling inside ComfyUI's sampler, as the official pipeline tiles large images.

A CALC_COND_BATCH wrapper splits each model evaluation into the official tile grid; the
tiles run through ComfyUI's own cond batching, as many per model call as memory allows,
with their ControlNets' hints cropped to each tile, and the predictions are blended with
the official Gaussian weights. The sampler itself (any of ComfyUI's) never knows. Per-tile
prompts (tile_prompts) give each tile's model call that tile's c_h and c_l.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import comfy.controlnet
import comfy.model_management
import comfy.utils

from ..xpsr_core.pipeline.tiling import Box, GaussianBlend, needs_tiling, stack_tiles, tile_boxes
from .control import XPSRControlNet
from .host_compat import device_clones
from .tile_prompts import TILE_PROMPTS_KEY, tile_indices


def full_hint(control: comfy.controlnet.ControlNet, height: int, width: int) -> torch.Tensor:
    """A control's hint at the full image size, resized the way that control's get_control would."""
    if isinstance(control, XPSRControlNet):
        return control.hint_at(height, width)
    return comfy.utils.common_upscale(control.cond_hint_original, width, height, control.upscale_algorithm, "center")


class TiledCondBatch:
    """CALC_COND_BATCH wrapper that evaluates the model on tiles when the latent is larger than tile^2.

    As many tiles as ComfyUI's memory estimate allows (``max_tiles`` at most) go into one
    model call, stacked along the batch (tile-major: row t * B + b is image b's tile t), so
    a large GPU evaluates the whole grid at once; each tile's result is the same as alone.
    A CPU batches too: at SD1.5 size (1024 px output, 9 tiles of 64 latent px, pytorch
    attention, 2 cores) a batched step took 0.77x the time of tile by tile (median of 3
    interleaved repeats: 0.77, 0.74, 1.19; benchmarks/run.py --sections tile_batching).
    """

    def __init__(self, tile: int, overlap: int, on_tile: Callable[[], None] = lambda: None,
                 max_tiles: int | None = None):
        self.tile = tile
        self.overlap = overlap
        self.on_tile = on_tile
        self.max_tiles = max_tiles
        self._tiled_controls: dict[tuple, comfy.controlnet.ControlBase] = {}
        self._full_hints: dict[tuple, torch.Tensor] = {}

    def tile_count(self, height: int, width: int) -> int:
        return len(tile_boxes(height, width, self.tile, self.overlap)) if needs_tiling(height, width, self.tile) else 1

    def tiles_per_call(self, model, conds: list, x_in: torch.Tensor, box: Box, tiles: int) -> int:
        """The most tiles (up to ``tiles``) whose model call fits ComfyUI's memory estimate, as _calc_cond_batch
        sizes its batches: ``memory_required * 1.5`` below the free memory; at least one."""
        limit = min(tiles, self.max_tiles or tiles)
        rows = sum(c is not None for c in conds) * x_in.shape[0]
        shape = list(x_in[box.slices].shape[1:])
        free = comfy.model_management.get_free_memory(x_in.device)
        for count in range(limit, 1, -1):
            if model.memory_required([count * rows] + shape) * 1.5 < free:
                return count
        return 1

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        height, width = x_in.shape[-2:]
        if not needs_tiling(height, width, self.tile):
            whole = [Box(0, height, 0, width)]
            for d in (d for c in conds if c is not None for d in c if TILE_PROMPTS_KEY in d):
                tile_indices(d[TILE_PROMPTS_KEY].grid, whole, whole)
            return executor(model, conds, x_in, timestep, model_options)
        boxes = tile_boxes(height, width, self.tile, self.overlap)
        blend = GaussianBlend(x_in, len(conds), boxes[0].y1 - boxes[0].y0)
        per_call = self.tiles_per_call(model, conds, x_in, boxes[0], len(boxes))
        for start in range(0, len(boxes), per_call):
            comfy.model_management.throw_exception_if_processing_interrupted()
            group = tuple(boxes[start:start + per_call])
            tile_conds = [None if c is None else [self._tile_cond(d, boxes, group, x_in.shape[0], height, width)
                                                  for d in c] for c in conds]
            blend.add(group, executor(model, tile_conds, stack_tiles(x_in, group), timestep.repeat(len(group)),
                                      model_options))
            for _ in group:
                comfy.model_management.throw_exception_if_processing_interrupted()
                self.on_tile()
        return blend.result()

    def _tile_cond(self, cond: dict, boxes: list[Box], group: tuple[Box, ...], batch: int, height: int,
                   width: int) -> dict:
        tiles = cond.get(TILE_PROMPTS_KEY)
        if tiles is not None:
            cond = tiles.for_tiles(cond, tile_indices(tiles.grid, boxes, group), batch)
        if cond.get("control") is None:
            return cond
        if "area" in cond or "mask" in cond:
            raise ValueError("XPSR tiled sampling does not support area or mask conditioning; raise the tile size so "
                             "the image is processed whole")
        return {**cond, "control": self._tile_control(cond["control"], group, batch, height, width)}

    def _tile_control(self, control: comfy.controlnet.ControlBase, group: tuple[Box, ...], batch: int, height: int,
                      width: int) -> comfy.controlnet.ControlBase:
        """A copy of ``control`` (and its chain, and its clones for other GPUs) whose hint is the group's tiles
        cropped from the full-size hint.

        The crops are stacked like the latent tiles: each repeated to the latent's batch, tile-major.
        """
        key = (id(control), group, batch, height, width)
        if key not in self._tiled_controls:
            if not isinstance(control, comfy.controlnet.ControlNet) or control.vae is not None:
                raise ValueError(f"XPSR tiled sampling can crop the hints of image ControlNets only, not of "
                                 f"{type(control).__name__}; raise the tile size so the image is processed whole")
            ratio = control.compression_ratio
            hint_key = (id(control), height, width)
            if hint_key not in self._full_hints:
                self._full_hints[hint_key] = full_hint(control, height * ratio, width * ratio)
            hint = self._full_hints[hint_key]
            tiled = control.copy()
            tiled.cond_hint_original = torch.cat([comfy.utils.repeat_to_batch_size(hint[box.scaled(ratio).slices],
                                                                                   batch) for box in group])
            tiled.timestep_range = control.timestep_range
            tiled.model_sampling_current = control.model_sampling_current
            if control.previous_controlnet is not None:
                tiled.set_previous_controlnet(self._tile_control(control.previous_controlnet, group, batch, height,
                                                                 width))
            clones = device_clones(control)
            if clones:
                tiled.multigpu_clones = {device: self._tile_control(clone, group, batch, height, width)
                                         for device, clone in clones.items()}
            self._tiled_controls[key] = tiled
        return self._tiled_controls[key]
