"""XPSR (Qu et al., 2024) in plain PyTorch, importable without ComfyUI.

The SFA-ControlNet, the UNet's conditional attention, an SD UNet for use outside
ComfyUI, and the loaders for the official checkpoint and the pack's single file.
"""

from .errors import CheckpointError
from .models.conditional_attention import ConditionalAttention
from .models.config import ControlNetConfig, UNetConfig
from .models.controlnet import ControlNetOutput, SFAControlNet
from .models.unet import UNet2DCondition
from .weights.checkpoint import XPSRCheckpoint, build_models, convert_official, load_checkpoint, save_single_file

__all__ = [
    "CheckpointError", "ConditionalAttention", "ControlNetConfig", "ControlNetOutput", "SFAControlNet",
    "UNet2DCondition", "UNetConfig", "XPSRCheckpoint", "build_models", "convert_official", "load_checkpoint",
    "save_single_file",
]
