"""A tiny random-weight Qwen3-VL text encoder: ComfyUI's own class, through ComfyUI's own loader.

The CLIP captioning route is tested on what Load CLIP makes of a Qwen3-VL file in models/text_encoders: a state dict
in the released layout (``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``) goes through
``comfy.sd.load_text_encoder_state_dicts``, which recognises Qwen3-VL-8B by its keys, renames them and builds
ComfyUI's Qwen3-VL text encoder with its tokenizer (the Qwen2.5 files that ship in comfy/text_encoders). Only the
sizes are tiny: the language model's through the loader's model options, the vision tower's by replacing ComfyUI's
table of them (QWEN3VL_VISION, which no option reaches) while the model is built.

The language-model head gives the stop tokens and every added token a zero logit while the others are random, so
greedy decoding never stops early: a caption runs to max_new_tokens. Import this module after comfy_host, which puts
ComfyUI on the path; it imports Qwen3-VL only when building, so it loads on hosts without it.
"""

from __future__ import annotations

import functools
from unittest import mock

import torch

import comfy.ops
import comfy.sd

SEED = 0
MODEL_TYPE = "qwen3vl_8b"
LANGUAGE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1}
"""The language model's sizes; heads stay 128 wide, as Qwen3-VL's multimodal rotary sections need."""
VISION = {"hidden_size": 32, "intermediate_size": 64, "depth": 2, "deepstack_visual_indexes": [0]}
VISION_COMMON = {"num_heads": 2, "num_position_embeddings": 64}
FIRST_ADDED_TOKEN = 151643
"""<|endoftext|>, the first of the tokens added to Qwen's vocabulary: the stop tokens, chat and vision markers."""


@functools.cache
def shared() -> comfy.sd.CLIP:
    """One tiny Qwen3-VL CLIP for the whole test session, as one Load CLIP output serves a server's prompts."""
    return build()


def build() -> comfy.sd.CLIP:
    """The tiny Qwen3-VL CLIP in fp32, the same weights every time."""
    import comfy.text_encoders.qwen3vl as qwen3vl

    with tiny_vision(qwen3vl):
        state = released_layout(random_weights(qwen3vl))
        return comfy.sd.load_text_encoder_state_dicts(
            [state], model_options={f"{MODEL_TYPE}_model_config": LANGUAGE, "dtype": torch.float32})


def tiny_vision(qwen3vl):
    """ComfyUI's vision sizes for Qwen3-VL-8B replaced by tiny ones, until the context ends."""
    return mock.patch.multiple(qwen3vl, QWEN3VL_VISION={**qwen3vl.QWEN3VL_VISION, MODEL_TYPE: VISION},
                               QWEN3VL_VISION_COMMON={**qwen3vl.QWEN3VL_VISION_COMMON, **VISION_COMMON})


def random_weights(qwen3vl) -> dict[str, torch.Tensor]:
    """Every tensor of ComfyUI's tiny Qwen3-VL under ComfyUI's names: small random matrices, unit norms, zero biases."""
    template = qwen3vl._make_qwen3vl_model(MODEL_TYPE)(LANGUAGE, torch.float32, "meta", comfy.ops.manual_cast)
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for key, meta in template.state_dict().items():
        if key.endswith("bias"):
            state[key] = torch.zeros(meta.shape)
        elif meta.ndim == 1:
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.randn(meta.shape, generator=generator) * 0.05
    state["model.lm_head.weight"][FIRST_ADDED_TOKEN:] = 0.0
    return state


def released_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's names as the released Qwen3-VL checkpoint spells them (what the loader converts back)."""
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("visual."):
            renamed[f"model.{key}"] = tensor
        elif key == "model.lm_head.weight":
            renamed["lm_head.weight"] = tensor
        else:
            renamed[f"model.language_model.{key.removeprefix('model.')}"] = tensor
    return renamed
