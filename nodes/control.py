"""XPSR's SFA-ControlNet as a ComfyUI ControlNet.

Attached to CONDITIONING like any ControlNet, so ComfyUI's samplers batch it, schedule it
(start/end percent) and load it next to the UNet. The low-level prompt embedding travels
in the conditioning itself (``model_conds["xpsr_lowlevel"]``), so each CFG branch brings
its own c_l through ComfyUI's cond batching. The ControlNet's attentions get the model
call's transformer_options, and it leaves its own residuals in them for the UNet's
conditional attention.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.controlnet
import comfy.model_base
import comfy.model_management
import comfy.utils

from ..xpsr_core.models.controlnet import SFAControlNet

LOWLEVEL_KEY = "xpsr_lowlevel"
"""The model_conds key that carries the low-level prompt embedding c_l."""

RESIDUALS_KEY = "xpsr_residuals"
"""The transformer_options key under which the XPSR ControlNet leaves its own down residuals for the model call.

Set only while the control is active; the UNet's conditional attention reads it, so it
attends to XPSR's residuals (after strength) whatever other ControlNets add to the skips.
"""


class ControlModel(nn.Module):
    """Adapts the core SFA-ControlNet to the call and return format of ComfyUI's control models."""

    def __init__(self, controlnet: SFAControlNet, dtype: torch.dtype):
        super().__init__()
        self.controlnet = controlnet
        self.dtype = dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                xpsr_lowlevel: torch.Tensor | None = None,
                transformer_options: dict | None = None) -> dict[str, list[torch.Tensor]]:
        out = self.controlnet(x, timesteps, context, hint, xpsr_lowlevel, transformer_options=transformer_options)
        return {"middle": [out.mid_residual], "output": out.down_residuals}


def add_previous(own: dict[str, list], previous: dict[str, list] | None) -> dict[str, list]:
    """Residuals of a ControlNet chain: ``own`` plus the previous controls' (ComfyUI's rule), in new lists.

    New lists, because the UNet pops the merged lists while ``own`` stays readable for the
    conditional attention.
    """
    out = {key: list(values) for key, values in own.items()}
    for key, values in (previous or {}).items():
        merged = out.setdefault(key, [])
        for i, value in enumerate(values):
            if i >= len(merged):
                merged.append(value)
            elif value is not None:
                merged[i] = value if merged[i] is None else value + merged[i]
    return out


class XPSRControlNet(comfy.controlnet.ControlNet):
    """The XPSR_CONTROLNET type: a ComfyUI ControlNet whose hint is the LR image, stretched with bicubic.

    ``upscale_algorithm`` is bicubic, so nodes that resize or crop the hint themselves
    through ComfyUI's fields (tiled upscalers: ``common_upscale(cond_hint_original, w, h,
    upscale_algorithm, "center")``) get the same hint as sampling the image whole.
    """

    def __init__(self, control_model: ControlModel | None = None, **kwargs):
        super().__init__(control_model, extra_conds=[LOWLEVEL_KEY], **kwargs)
        self.upscale_algorithm = "bicubic"

    def copy(self) -> XPSRControlNet:
        c = XPSRControlNet(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                           manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def hint_at(self, height: int, width: int) -> torch.Tensor:
        """The LR image (B, 3, h, w) stretched to (B, 3, height, width): the hint of a latent 1/8 that size."""
        if tuple(self.cond_hint_original.shape[-2:]) == (height, width):
            return self.cond_hint_original
        return comfy.utils.common_upscale(self.cond_hint_original, width, height, self.upscale_algorithm, "disabled")

    def active_at(self, t: torch.Tensor) -> bool:
        """Whether the step with sigmas ``t`` lies inside this control's start/end percent."""
        return self.timestep_range is None or self.timestep_range[1] <= t[0] <= self.timestep_range[0]

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        """ComfyUI's ControlNet call, with the call's transformer_options and XPSR's residuals left in them."""
        previous = None
        if self.previous_controlnet is not None:
            previous = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        if not self.active_at(t):
            return previous
        dtype = self.manual_cast_dtype or self.control_model.dtype
        height, width = x_noisy.shape[-2] * self.compression_ratio, x_noisy.shape[-1] * self.compression_ratio
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (height, width):
            self.cond_hint = self.hint_at(height, width).to(device=x_noisy.device, dtype=dtype)
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = comfy.controlnet.broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        extra = self.extra_args.copy()
        for name in self.extra_conds:
            if cond.get(name) is not None:
                extra[name] = comfy.model_base.convert_tensor(cond[name], dtype, x_noisy.device)
        timestep = self.model_sampling_current.timestep(t)
        x = self.model_sampling_current.calculate_input(t, x_noisy)
        control = self.control_model(x=x.to(dtype), hint=self.cond_hint, timesteps=timestep.to(dtype),
                                     context=comfy.model_management.cast_to_device(context, x_noisy.device, dtype),
                                     transformer_options=transformer_options, **extra)
        own = self.control_merge(control, None, output_dtype=None)
        transformer_options[RESIDUALS_KEY] = own["output"]
        return add_previous(own, previous)
