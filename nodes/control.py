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

import comfy.controlnet
import comfy.model_base
import comfy.model_management
import comfy.utils

from ..xpsr_core.models.controlnet import SFAControlNet
from .common import LOWLEVEL_KEY, RESIDUALS_KEY


def chain_residuals(own: dict[str, list], previous: dict[str, list] | None) -> dict[str, list]:
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
    """The XPSR_CONTROLNET type: the core ``SFAControlNet`` as a ComfyUI ControlNet whose hint is the LR image,
    stretched with bicubic.

    ``control_model`` is the SFAControlNet itself: ComfyUI's ModelPatcher loads and offloads
    the core module (whole, or layer by layer in the low-VRAM modes), and ``get_control``, the
    one place ComfyUI calls a ControlNet's model, turns its output into ComfyUI's {"middle",
    "output"} residuals and reads c_l from ``extra_conds``' one key. It computes in
    ``manual_cast_dtype`` when ComfyUI's ops cast the weights layer by layer (fp8, or a dtype
    the device cannot compute in), else in ``weight_dtype``, the dtype its weights are stored in.

    ``upscale_algorithm`` is bicubic, so nodes that resize or crop the hint themselves
    through ComfyUI's fields (tiled upscalers: ``common_upscale(cond_hint_original, w, h,
    upscale_algorithm, "center")``) get the same hint as sampling the image whole.
    """

    def __init__(self, controlnet: SFAControlNet | None, weight_dtype: torch.dtype, **kwargs):
        super().__init__(controlnet, extra_conds=[LOWLEVEL_KEY], **kwargs)
        self.weight_dtype = weight_dtype
        self.upscale_algorithm = "bicubic"

    def copy(self) -> XPSRControlNet:
        c = XPSRControlNet(None, self.weight_dtype, global_average_pooling=self.global_average_pooling,
                           load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
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
        dtype = self.manual_cast_dtype or self.weight_dtype
        height, width = x_noisy.shape[-2] * self.compression_ratio, x_noisy.shape[-1] * self.compression_ratio
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (height, width):
            self.cond_hint = self.hint_at(height, width).to(device=x_noisy.device, dtype=dtype)
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = comfy.controlnet.broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"])
        lowlevel = cond.get(LOWLEVEL_KEY)
        if lowlevel is not None:
            lowlevel = comfy.model_base.convert_tensor(lowlevel, dtype, x_noisy.device)
        timestep = self.model_sampling_current.timestep(t)
        x = self.model_sampling_current.calculate_input(t, x_noisy)
        out = self.control_model(x.to(dtype), timestep.to(dtype),
                                 comfy.model_management.cast_to_device(context, x_noisy.device, dtype),
                                 self.cond_hint, lowlevel, transformer_options=transformer_options)
        own = self.control_merge({"middle": [out.mid_residual], "output": out.down_residuals}, None, output_dtype=None)
        transformer_options[RESIDUALS_KEY] = own["output"]
        return chain_residuals(own, previous)
