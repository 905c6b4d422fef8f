"""XPSR (Qu et al., 2024) in plain PyTorch, importable without ComfyUI.

The SFA-ControlNet, the UNet's conditional attention, an SD UNet for use outside
ComfyUI, and the loaders for the official checkpoint and the pack's single file.
"""

from .checkpoint import XPSRCheckpoint, build_models, convert_official, load_checkpoint, save_single_file
from .conditional_attention import ConditionalAttention
from .config import ControlNetConfig, UNetConfig
from .controlnet import ControlNetOutput, SFAControlNet
from .errors import CheckpointError
from .unet import UNet2DCondition

__all__ = [
    "CheckpointError", "ConditionalAttention", "ControlNetConfig", "ControlNetOutput", "SFAControlNet",
    "UNet2DCondition", "UNetConfig", "XPSRCheckpoint", "build_models", "convert_official", "load_checkpoint",
    "save_single_file",
]
