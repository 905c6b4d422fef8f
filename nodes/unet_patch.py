"""XPSR's conditional attention inside ComfyUI's own SD1.5 UNet.

The attention sits inside each decoder block (after the resnet and the text attention,
before the upsampler). The patched MODEL replaces each of the UNet's output blocks, as an
object patch, by a copy holding the same layers plus a ``ConditionalAttentionMarker`` in
that place, which names the conditional attention to run there; ComfyUI's
``forward_timestep_embed_patch`` runs it at the marker with the call's transformer_options.
So the patch is installed once per MODEL (ComfyUI swaps the blocks in when it loads the
MODEL and back when it unloads it), is traced whole by torch.compile, and does nothing in a
call where the XPSR ControlNet left no residuals. The attention's weights are an additional
model of the MODEL, so ``load_models_gpu`` loads and offloads them with the UNet. Where
ComfyUI clones the MODEL for another GPU, the clone's marked blocks are made again from its
own UNet and name its own conditional attention: ComfyUI's multi-GPU sampling runs each
device's UNet with the first device's model options, so the weights a call uses must come
from the blocks, never from the options.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import comfy.model_patcher
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, Upsample

from ..xpsr_core.models.conditional_attention import ConditionalAttention
from .common import RESIDUALS_KEY
from .host_compat import multigpu_clone_callbacks

PATCH_KEY = "xpsr_conditional_attention"
MARKER_NAME = "xpsr_conditional_attention"
"""The marker's name inside an output block; the block's own layers keep their names (and state-dict keys)."""


class ConditionalAttentionMarker(nn.Module):
    """Marks where decoder layer ``index``'s conditional attention runs, and names that attention.

    The attention is held as a plain attribute, not a submodule: it is a model of its own
    (an additional model of the MODEL), and must not become part of the UNet's weights.
    """

    def __init__(self, index: int, attention: ConditionalAttention):
        super().__init__()
        self.index = index
        object.__setattr__(self, "attention", attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def run_conditional_attention(layer: ConditionalAttentionMarker, x: torch.Tensor, emb, context,
                              transformer_options: dict, *args) -> torch.Tensor:
    """The ``forward_timestep_embed_patch`` handler: the marker's conditional attention on the call's XPSR residuals.

    The ControlNet leaves its residuals (after strength) in transformer_options; the options
    are passed on, so attention overrides apply.
    """
    residuals = transformer_options.get(RESIDUALS_KEY)
    if residuals is None:
        return x
    return layer.attention(x, layer.index, residuals, transformer_options)


def with_marker(block: nn.Sequential, index: int, attention: ConditionalAttention) -> TimestepEmbedSequential:
    """A copy of output block ``block`` with decoder layer ``index``'s marker before its upsampler (or at its end)."""
    layers = [(name, m) for name, m in block.named_children() if not isinstance(m, ConditionalAttentionMarker)]
    marked = TimestepEmbedSequential()
    for name, module in layers:
        if isinstance(module, Upsample):
            marked.add_module(MARKER_NAME, ConditionalAttentionMarker(index, attention))
        marked.add_module(name, module)
    if MARKER_NAME not in marked._modules:
        marked.add_module(MARKER_NAME, ConditionalAttentionMarker(index, attention))
    return marked


def install(patched: comfy.model_patcher.ModelPatcher, attention: ConditionalAttention,
            block: Callable[[str], nn.Module]) -> None:
    """Put markers naming ``attention`` into ``patched``'s output blocks (``block(name)`` gives each block to mark)
    and the handler that runs them into its options, replacing any earlier XPSR patch."""
    for i in range(len(attention)):
        name = f"diffusion_model.output_blocks.{i}"
        patched.add_object_patch(name, with_marker(block(name), i, attention))
    patches = patched.model_options["transformer_options"].setdefault("patches", {})
    handlers = [p for p in patches.get("forward_timestep_embed_patch", []) if p[0] is not ConditionalAttentionMarker]
    handlers.append((ConditionalAttentionMarker, run_conditional_attention))
    patches["forward_timestep_embed_patch"] = handlers


def follow_device_clone(model: comfy.model_patcher.ModelPatcher, clone: comfy.model_patcher.ModelPatcher) -> None:
    """Bind a clone ComfyUI made of an XPSR MODEL for another GPU to the clone's own weights.

    The clone has a UNet and a conditional attention of its own (ComfyUI re-creates both with
    their loaders' ``cached_patcher_init``), but it copied the MODEL's object patches, whose
    marked blocks hold the first GPU's layers and name its conditional attention.
    """
    attention = clone.get_additional_models_with_key(PATCH_KEY)[0].model
    install(clone, attention, lambda name: comfy.utils.get_attr(clone.model, name))


def patch_model(model: comfy.model_patcher.ModelPatcher,
                attention: comfy.model_patcher.ModelPatcher) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` carrying the conditional attention (replacing any earlier XPSR patch)."""
    blocks = len(model.get_model_object("diffusion_model.output_blocks"))
    if blocks != len(attention.model):
        raise ValueError(f"XPSR: the UNet has {blocks} decoder layers; the conditional attention expects "
                         f"{len(attention.model)}")
    patched = model.clone()
    install(patched, attention.model, model.get_model_object)
    patched.set_additional_models(PATCH_KEY, [attention])
    for callback in multigpu_clone_callbacks():
        patched.add_callback_with_key(callback, PATCH_KEY, follow_device_clone)
    return patched
