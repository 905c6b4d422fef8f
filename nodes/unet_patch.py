"""XPSR's conditional attention inside ComfyUI's own SD1.5 UNet.

The attention sits inside each decoder block (after the resnet and the text attention,
before the upsampler). The patched MODEL replaces each of the UNet's output blocks, as an
object patch, by a copy holding the same layers plus a ``ConditionalAttentionMarker`` in
that place; ComfyUI's ``forward_timestep_embed_patch`` runs the conditional attention at the
marker with the call's transformer_options. So the patch is installed once per MODEL
(ComfyUI swaps the blocks in when it loads the MODEL and back when it unloads it), is
traced whole by torch.compile, and does nothing in a call where the XPSR ControlNet left
no residuals. The attention's weights are an additional model of the MODEL, so
``load_models_gpu`` loads and offloads them with the UNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import comfy.model_patcher
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, Upsample

from ..xpsr_core.models.conditional_attention import ConditionalAttention
from .common import RESIDUALS_KEY

PATCH_KEY = "xpsr_conditional_attention"
MARKER_NAME = "xpsr_conditional_attention"
"""The marker's name inside an output block; the block's own layers keep their names (and state-dict keys)."""


class ConditionalAttentionMarker(nn.Module):
    """Marks where decoder layer ``index``'s conditional attention runs; it has no weights of its own."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def conditional_attention_patch(attention: ConditionalAttention) -> Callable:
    """The ``forward_timestep_embed_patch`` handler that runs ``attention`` at each ``ConditionalAttentionMarker``.

    It reads the call's XPSR residuals from transformer_options (the ControlNet leaves them
    there, after strength) and passes the options on, so attention overrides apply. A plain
    function (a closure): ComfyUI deep-copies model_options on every clone, and a function
    is copied by reference, never the weights it holds.
    """
    def run(layer: ConditionalAttentionMarker, x: torch.Tensor, emb, context, transformer_options: dict,
            *args) -> torch.Tensor:
        residuals = transformer_options.get(RESIDUALS_KEY)
        if residuals is None:
            return x
        return attention(x, layer.index, residuals, transformer_options)
    return run


def with_marker(block: nn.Sequential, index: int) -> TimestepEmbedSequential:
    """A copy of output block ``block`` with decoder layer ``index``'s marker before its upsampler (or at its end)."""
    layers = [(name, m) for name, m in block.named_children() if not isinstance(m, ConditionalAttentionMarker)]
    marked = TimestepEmbedSequential()
    for name, module in layers:
        if isinstance(module, Upsample):
            marked.add_module(MARKER_NAME, ConditionalAttentionMarker(index))
        marked.add_module(name, module)
    if MARKER_NAME not in marked._modules:
        marked.add_module(MARKER_NAME, ConditionalAttentionMarker(index))
    return marked


def patch_model(model: comfy.model_patcher.ModelPatcher,
                attention: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` carrying the conditional attention (replacing any earlier XPSR patch)."""
    blocks = len(model.get_model_object("diffusion_model.output_blocks"))
    if blocks != len(attention.model):
        raise ValueError(f"XPSR: the UNet has {blocks} decoder layers; the conditional attention expects "
                         f"{len(attention.model)}")
    patched = model.clone()
    for i in range(blocks):
        name = f"diffusion_model.output_blocks.{i}"
        patched.add_object_patch(name, with_marker(model.get_model_object(name), i))
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    handlers = [p for p in patches.get("forward_timestep_embed_patch", []) if p[0] is not ConditionalAttentionMarker]
    handlers.append((ConditionalAttentionMarker, conditional_attention_patch(attention.model)))
    patches["forward_timestep_embed_patch"] = handlers
    patched.set_additional_models(PATCH_KEY, [attention])
    return patched
