"""What every XPSR node shares: the category, the XPSR_CONTROLNET socket type, dtype choices, model folders."""

from __future__ import annotations

import os

import torch

import folder_paths
from comfy_api.latest import io

CATEGORY = "image/upscaling/XPSR"
XPSRControlNetType = io.Custom("XPSR_CONTROLNET")
DTYPE_CHOICES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def choose_dtype(input_name: str, choice: str, auto: torch.dtype) -> torch.dtype:
    """A dtype input's torch dtype; ``auto`` is what the node would pick by itself."""
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"{input_name} is {choice!r}; expected one of {list(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[choice] or auto


def register_model_folder(name: str, extensions: set[str]) -> None:
    """Register ``models/<name>``, keeping any paths extra_model_paths.yaml gave it, and add ``extensions``."""
    paths, known = folder_paths.folder_names_and_paths.get(name, ([os.path.join(folder_paths.models_dir, name)], set()))
    folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)
