"""Latent tiling inside ComfyUI's sampler, as the official pipeline tiles large images.

A CALC_COND_BATCH wrapper splits each model evaluation into the official tile grid; every
tile runs through ComfyUI's own cond batching with its ControlNets' hints cropped to the
tile, and the predictions are blended with the official Gaussian weights. The sampler
itself (any of ComfyUI's) never knows.
"""

from __future__ import annotations

from typing import Callable

import torch

import comfy.controlnet
import comfy.model_management
import comfy.utils

from ..xpsr_core.tiling import Box, gaussian_weights, needs_tiling, tile_boxes
from .control import XPSRControlNet


def full_hint(control: comfy.controlnet.ControlNet, height: int, width: int) -> torch.Tensor:
    """A control's hint at the full image size, resized the way that control's get_control would."""
    if isinstance(control, XPSRControlNet):
        return control.resize_hint(height, width)
    return comfy.utils.common_upscale(control.cond_hint_original, width, height, control.upscale_algorithm, "center")


class TiledCondBatch:
    """CALC_COND_BATCH wrapper that evaluates the model tile by tile when the latent is larger than tile^2."""

    def __init__(self, tile: int, overlap: int, on_tile: Callable[[], None] = lambda: None):
        self.tile = tile
        self.overlap = overlap
        self.on_tile = on_tile
        self._tiled_controls: dict[tuple, comfy.controlnet.ControlBase] = {}
        self._full_hints: dict[tuple, torch.Tensor] = {}

    def tile_count(self, height: int, width: int) -> int:
        return len(tile_boxes(height, width, self.tile, self.overlap)) if needs_tiling(height, width, self.tile) else 1

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        height, width = x_in.shape[-2:]
        if not needs_tiling(height, width, self.tile):
            return executor(model, conds, x_in, timestep, model_options)
        boxes = tile_boxes(height, width, self.tile, self.overlap)
        weights = gaussian_weights(boxes[0].y1 - boxes[0].y0).to(x_in)
        outputs = [torch.zeros_like(x_in) for _ in conds]
        total = torch.zeros(x_in.shape[-2:], dtype=x_in.dtype, device=x_in.device)
        for box in boxes:
            comfy.model_management.throw_exception_if_processing_interrupted()
            area = (..., slice(box.y0, box.y1), slice(box.x0, box.x1))
            tile_conds = [None if c is None else [self._tile_cond(d, box, height, width) for d in c] for c in conds]
            for out, result in zip(outputs, executor(model, tile_conds, x_in[area], timestep, model_options)):
                out[area] += result * weights
            total[area] += weights
            self.on_tile()
        return [out / total for out in outputs]

    def _tile_cond(self, cond: dict, box: Box, height: int, width: int) -> dict:
        if cond.get("control") is None:
            return cond
        if "area" in cond or "mask" in cond:
            raise ValueError("XPSR tiled sampling does not support area or mask conditioning; raise the tile size so "
                             "the image is processed whole")
        return {**cond, "control": self._tile_control(cond["control"], box, height, width)}

    def _tile_control(self, control: comfy.controlnet.ControlBase, box: Box, height: int,
                      width: int) -> comfy.controlnet.ControlBase:
        """A copy of ``control`` (and its chain) whose hint is the tile's crop of the full-size hint."""
        key = (id(control), box, height, width)
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
            tiled.cond_hint_original = hint[..., box.y0 * ratio:box.y1 * ratio, box.x0 * ratio:box.x1 * ratio]
            tiled.timestep_range = control.timestep_range
            tiled.model_sampling_current = control.model_sampling_current
            if control.previous_controlnet is not None:
                tiled.set_previous_controlnet(self._tile_control(control.previous_controlnet, box, height, width))
            self._tiled_controls[key] = tiled
        return self._tiled_controls[key]
