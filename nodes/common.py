"""What every XPSR node shares: the category, the XPSR_CONTROLNET and XPSR_TILE_GRID socket types, the keys under
which XPSR's tensors travel through ComfyUI, dtype choices, model folders."""

from __future__ import annotations

import os

import torch

import folder_paths
from comfy_api.latest import io

CATEGORY = "image/upscaling/XPSR"
XPSRControlNetType = io.Custom("XPSR_CONTROLNET")
XPSRTileGridType = io.Custom("XPSR_TILE_GRID")
"""xpsr_core's TileGrid: where XPSR Sampler's latent tiles lie in the processed image."""

LOWLEVEL_KEY = "xpsr_lowlevel"
"""The model_conds key that carries the low-level prompt embedding c_l."""

RESIDUALS_KEY = "xpsr_residuals"
"""The transformer_options key under which the XPSR ControlNet leaves its own down residuals for the model call.

Set only while the control is active; the UNet's conditional attention reads it, so it
attends to XPSR's residuals (after strength) whatever other ControlNets add to the skips.
"""

DTYPE_CHOICES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHT_DTYPE_CHOICES = DTYPE_CHOICES | {"fp8_e4m3fn": torch.float8_e4m3fn}
"""Weight storage choices of the XPSR Loader: fp8 is stored only, and computed in the MODEL's dtype."""
FP8_DTYPES = {torch.float8_e4m3fn}


def choose_dtype(input_name: str, choice: str, auto: torch.dtype,
                 choices: dict[str, torch.dtype | None] = DTYPE_CHOICES) -> torch.dtype:
    """A dtype input's torch dtype among ``choices``; ``auto`` is what the node would pick by itself."""
    if choice not in choices:
        raise ValueError(f"{input_name} is {choice!r}; expected one of {list(choices)}")
    return choices[choice] or auto


def register_model_folder(name: str, extensions: set[str]) -> None:
    """Register ``models/<name>``, keeping any paths extra_model_paths.yaml gave it, and add ``extensions``."""
    paths, known = folder_paths.folder_names_and_paths.get(name, ([os.path.join(folder_paths.models_dir, name)], set()))
    folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)
