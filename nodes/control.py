"""XPSR's SFA-ControlNet as a ComfyUI ControlNet.

Attached to CONDITIONING like any ControlNet, so ComfyUI's samplers batch it, schedule it
(start/end percent) and load it next to the UNet. The low-level prompt embedding travels
in the conditioning itself (``model_conds["xpsr_lowlevel"]``), so each CFG branch brings
its own c_l through ComfyUI's cond batching.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.controlnet

from ..xpsr_core.controlnet import SFAControlNet
from ..xpsr_core.image import resize

LOWLEVEL_KEY = "xpsr_lowlevel"
"""The model_conds key that carries the low-level prompt embedding c_l."""

ACTIVE_KEY = "xpsr_control_active"
"""Set in transformer_options while the XPSR ControlNet runs, so the UNet's conditional attention runs too."""


class ControlModel(nn.Module):
    """Adapts the core SFA-ControlNet to the call and return format of ComfyUI's control models."""

    def __init__(self, controlnet: SFAControlNet, dtype: torch.dtype):
        super().__init__()
        self.controlnet = controlnet
        self.dtype = dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                xpsr_lowlevel: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        out = self.controlnet(x, timesteps, context, hint, xpsr_lowlevel)
        return {"middle": [out.mid_residual], "output": out.down_residuals}


class XPSRControlNet(comfy.controlnet.ControlNet):
    """The XPSR_CONTROLNET type: a ComfyUI ControlNet whose hint is the LR image."""

    def __init__(self, control_model: ControlModel | None = None, **kwargs):
        super().__init__(control_model, extra_conds=[LOWLEVEL_KEY], **kwargs)

    def copy(self) -> "XPSRControlNet":
        c = XPSRControlNet(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                           manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def resize_hint(self, height: int, width: int) -> torch.Tensor:
        """The LR image stretched to (height, width) with PIL's bicubic, as the official pipeline prepares it."""
        return resize(self.cond_hint_original, height, width)

    def active_at(self, t: torch.Tensor) -> bool:
        """Whether the step with sigmas ``t`` lies inside this control's start/end percent."""
        return self.timestep_range is None or self.timestep_range[1] <= t[0] <= self.timestep_range[0]

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if self.active_at(t):
            transformer_options[ACTIVE_KEY] = True
            height, width = x_noisy.shape[-2] * self.compression_ratio, x_noisy.shape[-1] * self.compression_ratio
            if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (height, width):
                dtype = self.manual_cast_dtype or self.control_model.dtype
                self.cond_hint = self.resize_hint(height, width).to(device=x_noisy.device, dtype=dtype)
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)
