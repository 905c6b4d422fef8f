"""XPSR's conditional attention inside ComfyUI's own SD1.5 UNet.

The attention sits inside each decoder block (after the resnet and the text attention,
before the upsampler), a place no ComfyUI patch point reaches. A DIFFUSION_MODEL wrapper
therefore hooks the decoder layers for the duration of one UNet call, when the XPSR
ControlNet is active in that call, and removes the hooks afterwards. The attention's
weights are an additional model of the MODEL, so ``load_models_gpu`` loads and offloads
them with the UNet.
"""

from __future__ import annotations

import torch
from torch import nn

import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

from ..xpsr_core.conditional_attention import ConditionalAttention
from .control import ACTIVE_KEY

PATCH_KEY = "xpsr_conditional_attention"


def decoder_layers(unet: nn.Module) -> list[nn.Module]:
    """The module after which each decoder layer's conditional attention runs (the last before an upsampler)."""
    return [[m for m in block if not isinstance(m, Upsample)][-1] for block in unet.output_blocks]


class ConditionalAttentionWrapper:
    """DIFFUSION_MODEL wrapper running the conditional attention with the ControlNet residuals of this call.

    The keys/values are the control residuals the UNet adds to its skips (after strength),
    exactly what the official UNet receives as ``down_block_additional_residuals``.
    """

    def __init__(self, attention: ConditionalAttention):
        self.attention = attention

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        residuals = list(control["output"]) if control and transformer_options.get(ACTIVE_KEY) else None
        if not residuals:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        layers = decoder_layers(executor.class_obj)
        if len(layers) != len(self.attention) or len(residuals) != len(self.attention):
            raise ValueError(f"XPSR: the UNet has {len(layers)} decoder layers and the ControlNet gave {len(residuals)} "
                             f"residuals; the conditional attention expects {len(self.attention)} of each")
        handles = [layer.register_forward_hook(self._hook(i, residuals)) for i, layer in enumerate(layers)]
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, layer: int, residuals: list[torch.Tensor]):
        def hook(module, args, output):
            if residuals[-1 - layer] is None:
                return output
            return self.attention(output, layer, residuals)
        return hook


def patch_model(model: comfy.model_patcher.ModelPatcher,
                attention: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` carrying the conditional attention (replacing any earlier XPSR patch)."""
    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY,
                                 ConditionalAttentionWrapper(attention.model))
    patched.set_additional_models(PATCH_KEY, [attention])
    return patched
