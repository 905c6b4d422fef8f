"""Training checkpoints in the official folder layout, plus the pack's single file and the resume state.

``checkpoint-N/`` holds what the official train.py writes (``controlnet/`` and ``unet/``, each
``config.json`` + ``diffusion_pytorch_model.safetensors``, fp32; ``unet/`` is the whole UNet:
the frozen SD1.5 tensors plus the conditional attention), so the official test script and
``xpsr_core.weights.checkpoint.load_checkpoint`` both read it. Beside them: ``xpsr.safetensors``, the
single file ComfyUI's XPSR Loader reads, and ``training_state/`` (optimizer, LR schedule,
loss scaler, step, random generator states) from which a run resumes exactly. A checkpoint is
written under a temporary name and renamed when complete, so an interrupted save never looks
like a checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..models.config import ControlNetConfig, UNetConfig
from ..models.unet import UNet2DCondition
from ..weights.checkpoint import DTYPES, XPSRCheckpoint, save_single_file
from .objective import XPSRTrainable

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SINGLE_FILE_NAME = "xpsr.safetensors"
STATE_DIR = "training_state"
STATE_TENSORS = "state.pt"
STATE_JSON = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

_COMMON_FIXED = {
    "act_fn": "silu", "class_embed_type": None, "downsample_padding": 1, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "upcast_attention": False, "use_linear_projection": False,
}
_CONTROLNET_FIXED = {
    "_class_name": "ControlNetModel", **_COMMON_FIXED, "controlnet_conditioning_channel_order": "rgb",
    "global_pool_conditions": False, "use_rrdb": False,
}
_UNET_FIXED = {
    "_class_name": "UNet2DConditionModel", **_COMMON_FIXED, "addition_embed_type": None,
    "center_input_sample": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "dual_cross_attention": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "time_embedding_type": "positional",
}


def _official_values(d: dict[str, Any]) -> dict[str, Any]:
    """Per-block lists that repeat one value written as that value, as SD1.5's configs have them."""
    for key in ("attention_head_dim", "transformer_layers_per_block"):
        if len(set(d[key])) == 1:
            d[key] = d[key][0]
    return d


def official_controlnet_config(config: ControlNetConfig) -> dict[str, Any]:
    """``controlnet/config.json`` as ``save_pretrained`` of the official ControlNet writes it."""
    d = _official_values(config.to_dict())
    if d["xpsr_fusion"] == "parallel":
        del d["xpsr_fusion"]
    return {**_CONTROLNET_FIXED, **d}


def official_unet_config(config: UNetConfig) -> dict[str, Any]:
    """``unet/config.json`` of the official UNet: SD1.5's config plus its (all false) low-level flags."""
    n = len(config.block_out_channels)
    flags = {"up_use_lowlevel_prompt": [False] * n, "mid_use_lowlevel_prompt": False, "down_use_lowlevel_prompt": False}
    return {**_UNET_FIXED, **_official_values(config.to_dict()), **flags}


def _write_model(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
              str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def trained_checkpoint(trainable: XPSRTrainable, unet_config: UNetConfig) -> XPSRCheckpoint:
    """The trained weights as the pack's checkpoint object (CPU, fp32)."""
    def cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}

    return XPSRCheckpoint(trainable.controlnet.config, unet_config, cpu(trainable.controlnet),
                          cpu(trainable.conditional_attention))


def write_checkpoint(folder: Path, trainable: XPSRTrainable, base_unet: UNet2DCondition, single_file_dtype: str,
                     training_state: dict[str, Any], global_step: int) -> Path:
    """Write ``folder`` (``checkpoint-N``) completely, replacing an older one of the same name."""
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    ckpt = trained_checkpoint(trainable, base_unet.config)
    _write_model(partial / "controlnet", official_controlnet_config(ckpt.controlnet_config), ckpt.controlnet)
    _write_model(partial / "unet", official_unet_config(ckpt.unet_config),
                 {**base_unet.state_dict(), **ckpt.conditional_attention})
    save_single_file(ckpt, partial / SINGLE_FILE_NAME, DTYPES[single_file_dtype])
    state_dir = partial / STATE_DIR
    state_dir.mkdir()
    torch.save(training_state, state_dir / STATE_TENSORS)
    (state_dir / STATE_JSON).write_text(json.dumps({"global_step": global_step}) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


def read_training_state(folder: Path) -> tuple[int, dict[str, Any]]:
    """The step and the optimizer / schedule / scaler / generator states saved in ``folder``."""
    state_dir = folder / STATE_DIR
    if not (state_dir / STATE_JSON).is_file() or not (state_dir / STATE_TENSORS).is_file():
        raise CheckpointError(f"{folder}: no {STATE_DIR}/{STATE_JSON} and {STATE_DIR}/{STATE_TENSORS}; expected a "
                              "checkpoint written by xpsr_core.training (a released checkpoint has no training state)")
    step = json.loads((state_dir / STATE_JSON).read_text())["global_step"]
    return int(step), torch.load(state_dir / STATE_TENSORS, map_location="cpu", weights_only=True)


def checkpoint_step(folder: Path) -> int | None:
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in output_dir.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for folder in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(folder)
