"""Captions through a ComfyUI CLIP whose model generates text from images (Qwen3-VL, Gemma 3 or 4 with vision, ...,
loaded with Load CLIP from models/text_encoders).

Each caption is what ComfyUI's own Generate Text node (TextGenerate) writes with sampling off: the CLIP tokenizes the
instruction with the image in its chat template, ``CLIP.generate`` places the model through ComfyUI's model
management and decodes greedily, ``CLIP.decode`` turns the tokens into text. The text is then cleaned as the MLLM
route cleans its captions, so both routes give the same kind of line.

ComfyUI's generation loop decodes one sequence (it reads one token per step, and Qwen3-VL's image positions are
built for one prompt), so a batch is captioned one image at a time, with an interrupt check between images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

import comfy.model_management as mm
import comfy.sd
import comfy.utils

from ..xpsr_core.captioning.mllm import DEFAULT_MAX_NEW_TOKENS, clean_caption
from . import host_compat

EXPECTED = "a CLIP whose model generates text from images, e.g. Qwen3-VL loaded with Load CLIP"

Pictures = torch.Tensor | Sequence[Image.Image | torch.Tensor]
"""An IMAGE batch (N, H, W, 3) in [0, 1], or pictures: 8-bit RGB images or IMAGEs of one picture each."""


def require_generating_clip(clip: comfy.sd.CLIP) -> None:
    """Refuse, saying why, a CLIP that cannot caption: the host has no text generation, or its model cannot see."""
    if not host_compat.host_generates_text():
        raise ValueError(f"clip: expected {EXPECTED}; this ComfyUI has no such route (a CLIP generates text only in "
                         "ComfyUI releases after 0.3.64, those with the Generate Text node): update ComfyUI, or "
                         "connect mllm from XPSR MLLM Loader instead")
    if not host_compat.clip_generates_text(clip):
        model = type(getattr(clip, "cond_stage_model", clip)).__name__
        raise ValueError(f"clip: expected {EXPECTED}; this CLIP's model ({model}) cannot generate text from images "
                         "(a prompt encoder such as SD1.5's CLIP-L only encodes): load a vision-language text "
                         "encoder, or connect mllm from XPSR MLLM Loader instead")


def caption_image(clip: comfy.sd.CLIP, image: torch.Tensor, instruction: str,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> str:
    """One picture's caption (image: (1, H, W, 3) in [0, 1]), by the calls TextGenerate makes with sampling off.

    Only greedy decoding is passed on: ComfyUI's sampler applies its other settings (repetition penalty included)
    only when sampling, which would make a caption depend on a seed.
    """
    tokens = clip.tokenize(instruction, image=image, skip_template=False, min_length=1, thinking=False)
    return clean_caption(clip.decode(clip.generate(tokens, do_sample=False, max_length=max_new_tokens)))


def caption_images(clip: comfy.sd.CLIP, images: Pictures, instruction: str,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   progress: comfy.utils.ProgressBar | None = None) -> list[str]:
    """One clean caption per picture, one generate call each, in order.

    An interrupt stops before the next picture; inside one, ComfyUI's own checks (its server's progress hook, its
    layers on recent releases) stop generation. ``progress`` advances by one per picture (a bar of its own when
    None), so a node captioning with several instructions can show them on one bar.
    """
    require_generating_clip(clip)
    pictures = as_images(images)
    progress = progress if progress is not None else comfy.utils.ProgressBar(len(pictures))
    captions = []
    for picture in pictures:
        mm.throw_exception_if_processing_interrupted()
        captions.append(caption_image(clip, picture, instruction, max_new_tokens))
        progress.update(1)
    return captions


def as_images(images: Pictures) -> list[torch.Tensor]:
    """Every picture as an IMAGE of one, (1, H, W, 3) float in [0, 1]: what the CLIP's tokenizer takes."""
    if isinstance(images, torch.Tensor):
        return [image.unsqueeze(0) for image in images]
    return [_as_image(picture) for picture in images]


def _as_image(picture: Image.Image | torch.Tensor) -> torch.Tensor:
    if isinstance(picture, Image.Image):
        return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
    return picture if picture.ndim == 4 else picture.unsqueeze(0)
