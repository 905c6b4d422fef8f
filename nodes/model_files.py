"""Where XPSR files live (``models/xpsr``) and how they become ComfyUI-managed models."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import folder_paths

from ..xpsr_core.errors import CheckpointError
from ..xpsr_core.models.config import UNetConfig
from ..xpsr_core.weights.checkpoint import (
    XPSRCheckpoint,
    build_conditional_attention,
    build_controlnet,
    load_checkpoint,
)
from .common import FP8_DTYPES, WEIGHT_DTYPE_CHOICES, choose_dtype, register_model_folder
from .control import XPSRControlNet
from .host_compat import core_model_patcher

FOLDER = "xpsr"

register_model_folder(FOLDER, {".safetensors"})


def _official_folders(base: Path, depth: int = 3) -> list[str]:
    """Official checkpoint folders under ``base``, through symlinks as ComfyUI lists model files (the depth bounds
    a link loop)."""
    found = []
    for root, dirs, _ in os.walk(base, followlinks=True):
        rel = Path(root).relative_to(base)
        if {"controlnet", "unet"} <= set(dirs) and rel.parts:
            found.append(rel.as_posix())
            dirs.clear()
        elif len(rel.parts) >= depth:
            dirs.clear()
    return found


def list_models() -> list[str]:
    """Single files and official checkpoint folders under the xpsr model folders (not the folders' own files)."""
    folders = [f for base in folder_paths.get_folder_paths(FOLDER) if os.path.isdir(base)
               for f in _official_folders(Path(base))]
    files = [f for f in folder_paths.get_filename_list(FOLDER)
             if not any(Path(f).as_posix().startswith(d + "/") for d in folders)]
    return sorted(files + folders)


def resolve(name: str) -> Path:
    for base in folder_paths.get_folder_paths(FOLDER):
        path = Path(base) / name
        if path.exists():
            return path
    raise ValueError(f"XPSR model '{name}' not found in {folder_paths.get_folder_paths(FOLDER)}; put the single file "
                     "from `python -m xpsr_core.weights.convert` (or an official checkpoint folder) there")


def check_base_model(model: comfy.model_patcher.ModelPatcher, unet: UNetConfig, source: str) -> None:
    """Refuse a MODEL that is not the SD1.5 UNet the XPSR weights were trained on, before any work."""
    config = model.model.model_config
    if not isinstance(config, comfy.supported_models.SD15):
        raise ValueError(f"XPSR needs a Stable Diffusion 1.5 MODEL; the MODEL given is {type(config).__name__}. "
                         "Load an SD1.5 checkpoint (e.g. v1-5-pruned-emaonly) with Load Checkpoint")
    found = config.unet_config
    base = unet.block_out_channels[0]
    expected = {
        "in_channels": unet.in_channels,
        "model_channels": base,
        "channel_mult": [c // base for c in unet.block_out_channels],
        "num_res_blocks": [unet.layers_per_block] * len(unet.block_out_channels),
        "context_dim": unet.cross_attention_dim,
    }
    for key, value in expected.items():
        got = list(found.get(key)) if isinstance(found.get(key), (list, tuple)) else found.get(key)
        if got != value:
            raise ValueError(f"XPSR: the MODEL's UNet has {key} = {got}, but {source} was trained for {key} = {value}")


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   transformer_options: dict | None = None, attn_precision: torch.dtype | None = None) -> torch.Tensor:
    """XPSR's attentions through ComfyUI's attention selection, as the UNet's own CrossAttention calls it.

    ``optimized_attention`` is looked up per call (launch flags and nodes that replace it
    apply), and the call's transformer_options carry any ``optimized_attention_override``.
    """
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=attn_precision,
                                                           transformer_options=transformer_options)


@dataclass(frozen=True)
class LayerSettings:
    """How XPSR's layers are built beside a given MODEL: weight storage, compute dtype, attention precision."""

    dtype: torch.dtype
    manual_cast_dtype: torch.dtype | None
    attn_precision: torch.dtype | None

    @classmethod
    def beside(cls, model: comfy.model_patcher.ModelPatcher, weight_dtype: str) -> LayerSettings:
        """fp8 weights are stored in fp8 and computed in the MODEL's compute dtype (ComfyUI's manual-cast ops cast
        each layer's weights as it runs); the attentions take the MODEL's attn_precision, as its own do."""
        dtype = choose_dtype("weight_dtype", weight_dtype, model.model_dtype(), WEIGHT_DTYPE_CHOICES)
        if dtype in FP8_DTYPES:
            manual_cast = model.model.manual_cast_dtype or model.model_dtype()
        else:
            manual_cast = comfy.model_management.unet_manual_cast(dtype, comfy.model_management.get_torch_device())
        return cls(dtype, manual_cast, model.model.model_config.unet_config.get("attn_precision"))

    def build_arguments(self) -> dict:
        """The core builders' arguments: ComfyUI's ops and attention, on ComfyUI's offload device."""
        operations = comfy.ops.pick_operations(self.dtype, self.manual_cast_dtype,
                                               load_device=comfy.model_management.get_torch_device())
        return {"attention": functools.partial(host_attention, attn_precision=self.attn_precision),
                "operations": operations, "device": comfy.model_management.unet_offload_device(),
                "dtype": self.dtype}


def read_checkpoint(path: Path) -> XPSRCheckpoint:
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from e


def conditional_attention_patcher(path: str, ckpt: XPSRCheckpoint, settings: LayerSettings,
                                  disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    """The conditional attention of ``ckpt`` (read from ``path``) in the patcher ComfyUI holds its own models in
    (a plain ModelPatcher where ``disable_dynamic`` asks for one, as ComfyUI's loaders do).

    Its ``cached_patcher_init`` re-reads the file: ComfyUI (0.24 and later) calls it when it
    needs a copy of the model's own, one per GPU or one without dynamic VRAM.
    """
    patcher = comfy.model_patcher.ModelPatcher if disable_dynamic else core_model_patcher()
    attention = patcher(build_conditional_attention(ckpt, **settings.build_arguments()),
                        load_device=comfy.model_management.get_torch_device(),
                        offload_device=comfy.model_management.unet_offload_device())
    attention.cached_patcher_init = (reload_conditional_attention, (path, settings))
    return attention


def reload_conditional_attention(path: str, settings: LayerSettings,
                                 disable_dynamic: bool = False) -> comfy.model_patcher.ModelPatcher:
    return conditional_attention_patcher(path, read_checkpoint(Path(path)), settings, disable_dynamic)


def load_xpsr(path: Path, model: comfy.model_patcher.ModelPatcher,
              weight_dtype: str) -> tuple[XPSRControlNet, comfy.model_patcher.ModelPatcher]:
    """The ControlNet and the conditional attention, built with ComfyUI's ops on its offload device, each held by
    the patcher ComfyUI holds its own models in (so dynamic VRAM streams them as it streams the UNet)."""
    ckpt = read_checkpoint(path)
    check_base_model(model, ckpt.unet_config, path.name)
    settings = LayerSettings.beside(model, weight_dtype)
    control = XPSRControlNet(build_controlnet(ckpt, **settings.build_arguments()), settings.dtype,
                             load_device=comfy.model_management.get_torch_device(),
                             manual_cast_dtype=settings.manual_cast_dtype)
    return control, conditional_attention_patcher(str(path), ckpt, settings)
