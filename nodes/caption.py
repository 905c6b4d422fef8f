"""MLLM captioning nodes: XPSR's high-level and low-level prompts from a local vision-language model.

The model is a ComfyUI-managed model: ``load_models_gpu`` places it (evicting diffusion
models first when room is short) and evicts it when they need the room; with keep_loaded
off it is unloaded as soon as the captions are written. Models come only from local
folders under ``models/LLM``; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..xpsr_core.captions import (HIGH_LEVEL_INSTRUCTION, LOW_LEVEL_INSTRUCTION, caption_paths, list_lr_images,
                                  write_caption)
from ..xpsr_core.image import to_rgb
from ..xpsr_core.mllm import (DEFAULT_MAX_NEW_TOKENS, CaptionModel, CaptionModelError, caption_image,
                              list_model_folders, load_caption_model)
from .access import allowed_path, dataset_folder, require_remote_code_allowed
from .common import CATEGORY, DTYPE_CHOICES, choose_dtype, register_model_folder

FOLDER = "LLM"
XPSRMLLMType = io.Custom("XPSR_MLLM")


register_model_folder(FOLDER, set())


def list_models() -> list[str]:
    return sorted({f for base in folder_paths.get_folder_paths(FOLDER) for f in list_model_folders(base)})


class _Holder(nn.Module):
    """Gives ModelPatcher a plain module to move: transformers models expose a read-only ``device``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


@dataclass
class MLLM:
    """The XPSR_MLLM type: a caption model and the ModelPatcher through which ComfyUI places it."""

    caption_model: CaptionModel
    patcher: comfy.model_patcher.ModelPatcher

    def load(self) -> None:
        mm.load_models_gpu([self.patcher], force_full_load=True)

    def unload(self) -> None:
        for loaded in list(mm.current_loaded_models):
            if loaded.model is self.patcher:
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)
        mm.soft_empty_cache()


def load_mllm(name: str, dtype: str, trust_remote_code: bool) -> MLLM:
    if trust_remote_code:
        require_remote_code_allowed(name)
    path = next((Path(b) / name for b in folder_paths.get_folder_paths(FOLDER) if (Path(b) / name).is_dir()), None)
    if path is None:
        raise ValueError(f"MLLM folder '{name}' not found under {folder_paths.get_folder_paths(FOLDER)}; place a "
                         "Hugging Face model folder (config.json, weights, processor files) there")
    device = mm.text_encoder_device()
    weight_dtype = choose_dtype("dtype", dtype, mm.text_encoder_dtype(device))
    try:
        caption_model = load_caption_model(path, weight_dtype, trust_remote_code)
    except CaptionModelError as e:
        raise ValueError(str(e)) from e
    patcher = comfy.model_patcher.ModelPatcher(_Holder(caption_model.model), load_device=device,
                                               offload_device=mm.text_encoder_offload_device())
    return MLLM(caption_model, patcher)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One RGB IMAGE (H, W, 3 in [0, 1]) as an 8-bit picture, as the official scripts read PNG files."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def open_rgb(path: Path) -> Image.Image:
    """An image file as RGB pixels, read as the official captioning scripts read it (no EXIF rotation)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def captions(mllm: MLLM, pictures: Iterable[Image.Image], count: int, instructions: list[str], max_new_tokens: int,
             keep_loaded: bool) -> Iterator[list[str]]:
    """Each picture's captions, one per instruction, with progress, interrupts and OOM advice.

    A generator, so a dataset is written picture by picture and an interrupt keeps what is done.
    """
    bar = comfy.utils.ProgressBar(count * len(instructions))
    mllm.load()
    try:
        for picture in pictures:
            row = []
            for instruction in instructions:
                row.append(caption_image(mllm.caption_model, picture, instruction, max_new_tokens,
                                         on_token=mm.throw_exception_if_processing_interrupted))
                bar.update(1)
            yield row
    except torch.OutOfMemoryError as e:
        raise ValueError(f"out of memory while captioning with {mllm.caption_model.path.name}: try dtype fp16 or bf16, "
                         "a smaller model (e.g. Qwen2-VL-2B-Instruct) or fewer max_new_tokens, and keep_loaded off "
                         "on other MLLM nodes") from e
    finally:
        if not keep_loaded:
            mllm.unload()


def caption_targets(image: Path, overwrite: bool) -> list[Path | None]:
    """The LR image's caption files to write, high level then low level; None for one that stays.

    A file that exists (a dangling symlink too) is someone's caption and stays unless overwrite is on; an
    image missing one caption is captioned for both and only the missing file is written. The image and
    the files to write must resolve inside the allowed folders, so nothing is read or written through a
    symlink that leads out of them.
    """
    allowed_path(image, f"LR image {str(image)!r}")
    paths = caption_paths(image)
    targets = [p if overwrite or not os.path.lexists(p) else None for p in (paths.high_level, paths.low_level)]
    for target in filter(None, targets):
        allowed_path(target, f"caption file {str(target)!r}")
    return targets


def _instruction_inputs() -> list:
    return [
        io.String.Input("high_level_instruction", multiline=True, default=HIGH_LEVEL_INSTRUCTION,
                        tooltip="Asks for the content (official LLaVA instruction)."),
        io.String.Input("low_level_instruction", multiline=True, default=LOW_LEVEL_INSTRUCTION,
                        tooltip="Asks for the quality (the paper's instruction; the official Q-Instruct script "
                                "sends 'Describe and evaluate the quality of the image.')."),
        io.Int.Input("max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, min=1, max=2048,
                     tooltip="Longest caption in tokens (official 170); decoding is greedy."),
        io.Boolean.Input("keep_loaded", default=False,
                         tooltip="Keep the MLLM in memory after captioning; off frees it for diffusion at once. "
                                 "Either way ComfyUI evicts it when other models need the room."),
    ]


class XPSRMLLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRMLLMLoader",
            display_name="XPSR MLLM Loader",
            category=CATEGORY,
            description="Loads a local vision-language model (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL or any "
                        "transformers image-text-to-text model) from models/LLM for XPSR's captions. Never downloads.",
            inputs=[
                io.Combo.Input("model", options=list_models(),
                               tooltip="A Hugging Face model folder under models/LLM (e.g. llava-hf/llava-1.5-7b-hf, "
                                       "the official high-level model)."),
                io.Combo.Input("dtype", options=list(DTYPE_CHOICES), default="auto",
                               tooltip="auto: fp16 on a GPU that supports it, else fp32."),
                io.Boolean.Input("trust_remote_code", default=False,
                                 tooltip="Run the Python code shipped in the model folder, for image-text-to-text "
                                         "models that transformers does not know. Only for folders you trust; the "
                                         "server runs it only if started with XPSR_ALLOW_REMOTE_CODE=1."),
            ],
            outputs=[XPSRMLLMType.Output(display_name="mllm",
                                          tooltip="The MLLM, for XPSR Caption or XPSR Caption Dataset.")],
        )

    @classmethod
    def execute(cls, model: str, dtype: str, trust_remote_code: bool) -> io.NodeOutput:
        return io.NodeOutput(load_mllm(model, dtype, trust_remote_code))


class XPSRCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRCaption",
            display_name="XPSR Caption",
            category=CATEGORY,
            description="Writes XPSR's two prompts for every image of a batch: a high-level caption (content) and a "
                        "low-level one (quality). Feed them to XPSR Dual Prompt Encode (one prompt per image) or to "
                        "any text input.",
            inputs=[XPSRMLLMType.Input("mllm", tooltip="From XPSR MLLM Loader."),
                    io.Image.Input("image", tooltip="The low-resolution image(s)."),
                    *_instruction_inputs()],
            outputs=[io.String.Output(display_name="high_level", is_output_list=True,
                                     tooltip="The content captions, one per image, for XPSR Dual Prompt Encode's "
                                             "high_level."),
                     io.String.Output(display_name="low_level", is_output_list=True,
                                     tooltip="The quality captions, one per image, for XPSR Dual Prompt Encode's "
                                             "low_level.")],
        )

    @classmethod
    def execute(cls, mllm: MLLM, image: torch.Tensor, high_level_instruction: str, low_level_instruction: str,
                max_new_tokens: int, keep_loaded: bool) -> io.NodeOutput:
        rows = list(captions(mllm, (to_pil(i) for i in to_rgb(image)), image.shape[0],
                             [high_level_instruction, low_level_instruction], max_new_tokens, keep_loaded))
        return io.NodeOutput([r[0] for r in rows], [r[1] for r in rows])


class XPSRCaptionDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRCaptionDataset",
            display_name="XPSR Caption Dataset",
            category=CATEGORY,
            description="Captions a dataset once, in the official layout: for <folder>/LR/<name>.png writes "
                        "<folder>/highlevel_prompt/<name>.txt and <folder>/lowlevel_prompt_q/<name>.txt, leaving "
                        "caption files that exist alone unless overwrite is on. The folder lies in ComfyUI's input "
                        "or output folder, or in a folder the server's owner lists in XPSR_DATASET_DIRS.",
            is_output_node=True,
            inputs=[XPSRMLLMType.Input("mllm", tooltip="From XPSR MLLM Loader."),
                    io.String.Input("dataset", default="",
                                    tooltip="The folder that holds LR/: relative to ComfyUI's input folder, or "
                                            "absolute inside the input or output folder or a folder listed in "
                                            "XPSR_DATASET_DIRS."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace caption files that exist; off writes only the missing ones."),
                    *_instruction_inputs()],
            outputs=[io.String.Output(display_name="summary",
                                      tooltip="How many of the dataset's LR images were captioned, for a text "
                                              "display node.")],
        )

    @classmethod
    def execute(cls, mllm: MLLM, dataset: str, overwrite: bool, high_level_instruction: str,
                low_level_instruction: str, max_new_tokens: int, keep_loaded: bool) -> io.NodeOutput:
        folder = dataset_folder(dataset)
        images = list_lr_images(folder)
        jobs = [(image, targets) for image in images if any(targets := caption_targets(image, overwrite))]
        rows = captions(mllm, (open_rgb(image) for image, _ in jobs), len(jobs),
                        [high_level_instruction, low_level_instruction], max_new_tokens, keep_loaded)
        for (_, targets), row in zip(jobs, rows):
            for target, caption in zip(targets, row, strict=True):
                if target is not None:
                    write_caption(target, caption)
        summary = f"captioned {len(jobs)} of {len(images)} LR images in {folder}"
        return io.NodeOutput(summary, ui={"text": [summary]})

