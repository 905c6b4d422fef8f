"""MLLM captioning nodes: XPSR's high-level and low-level prompts from a local vision-language model.

The model is a ComfyUI-managed model: ``load_models_gpu`` places it (evicting diffusion
models first when room is short) and evicts it when they need the room; with keep_loaded
off it is unloaded as soon as the captions are written. Models come only from local
folders under ``models/LLM``; nothing is downloaded. XPSR Caption also takes, instead, a
CLIP whose model generates text from images (comfy_vlm), which ComfyUI loads and places.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..xpsr_core.captioning import caption_dataset
from ..xpsr_core.captioning.caption_dataset import dual_instructions, write_dataset_captions
from ..xpsr_core.captioning.captions import HIGH_LEVEL_INSTRUCTION, LOW_LEVEL_INSTRUCTION, list_lr_images
from ..xpsr_core.captioning.mllm import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    OFFICIAL_LOW_LEVEL,
    CaptionModel,
    CaptionModelError,
    Decoding,
    caption_rows,
    list_model_folders,
    load_caption_model,
    out_of_memory_advice,
)
from ..xpsr_core.pipeline.image import to_rgb
from ..xpsr_core.pipeline.tiling import TileGrid
from . import comfy_vlm
from .access import allowed_path, dataset_folder, require_remote_code_allowed
from .common import CATEGORY, DTYPE_CHOICES, XPSRTileGridType, choose_dtype, register_model_folder
from .tile_captions import caption_tiles

FOLDER = "LLM"
XPSRMLLMType = io.Custom("XPSR_MLLM")


register_model_folder(FOLDER, set())


def list_models() -> list[str]:
    return sorted({f for base in folder_paths.get_folder_paths(FOLDER) for f in list_model_folders(base)})


class _MovableModel(nn.Module):
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
        unload(self.patcher)


def unload(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Offload one model ComfyUI placed, now rather than when another model needs the room."""
    for loaded in list(mm.current_loaded_models):
        if loaded.model is patcher:
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
    patcher = comfy.model_patcher.ModelPatcher(_MovableModel(caption_model.model), load_device=device,
                                               offload_device=mm.text_encoder_offload_device())
    return MLLM(caption_model, patcher)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One RGB IMAGE (H, W, 3 in [0, 1]) as an 8-bit picture, as the official scripts read PNG files."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def captions(mllm: MLLM, pictures: Iterable[Image.Image], count: int, instructions: list[tuple[str, Decoding]],
             batch_size: int, keep_loaded: bool) -> Iterator[list[str]]:
    """Each picture's captions, one per instruction, batch_size pictures per generate call, with progress,
    interrupts and OOM advice.

    A generator, so a dataset is written batch by batch and an interrupt keeps what is done.
    """
    bar = comfy.utils.ProgressBar(count * len(instructions))
    mllm.load()
    try:
        for row in caption_rows(mllm.caption_model, pictures, instructions, batch_size,
                                on_token=mm.throw_exception_if_processing_interrupted):
            bar.update(len(instructions))
            yield row
    except torch.OutOfMemoryError as e:
        raise ValueError(out_of_memory_advice(mllm.caption_model)) from e
    finally:
        if not keep_loaded:
            mllm.unload()


def caption_targets(image: Path, overwrite: bool) -> list[Path | None]:
    """caption_dataset.caption_targets inside the allowed folders: the image and the files to write must resolve
    inside them, so nothing is read or written through a symlink that leads out of them."""
    allowed_path(image, f"LR image {str(image)!r}")
    targets = caption_dataset.caption_targets(image, overwrite)
    for target in filter(None, targets):
        allowed_path(target, f"caption file {str(target)!r}")
    return targets


def _instruction_inputs() -> list:
    """The inputs both caption nodes share; those added since the first release come last and are optional, so
    prompts saved before them still validate, with the defaults."""
    return [
        io.String.Input("high_level_instruction", multiline=True, default=HIGH_LEVEL_INSTRUCTION,
                        tooltip="Asks for the content (official LLaVA instruction)."),
        io.String.Input("low_level_instruction", multiline=True, default=LOW_LEVEL_INSTRUCTION,
                        tooltip="Asks for the quality (the paper's instruction; the official Q-Instruct script "
                                "sends 'Describe and evaluate the quality of the image.')."),
        io.Int.Input("max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS, min=1, max=2048,
                     tooltip="Longest caption in tokens (official LLaVA: 170, greedy). The high-level caption is "
                             "always greedy; the low-level one too unless low_level_num_beams is above 1."),
        io.Boolean.Input("keep_loaded", default=False,
                         tooltip="Keep the captioning model in memory after captioning; off frees it for diffusion at "
                                 "once. Either way ComfyUI evicts it when other models need the room."),
        io.Int.Input("batch_size", optional=True, default=DEFAULT_BATCH_SIZE, min=1, max=256,
                     tooltip="Images captioned together in one padded batch (both prompts at once when they are "
                             "decoded alike); greedy captions are the same as one at a time. Out of memory halves it "
                             "and retries."),
        io.Int.Input("low_level_num_beams", optional=True, default=1, min=1, max=16,
                     tooltip=f"Beam search for the low-level caption; 1: greedy. The official low-level captioner "
                             f"(Q-Instruct XComposer) uses {OFFICIAL_LOW_LEVEL.num_beams} (do_sample=False, "
                             "min_length=1)."),
        io.Float.Input("low_level_repetition_penalty", optional=True, default=1.0, min=0.01, max=10.0, step=0.05,
                       tooltip=f"Penalty on repeated tokens in the low-level caption; 1.0: none. Official "
                               f"Q-Instruct: {OFFICIAL_LOW_LEVEL.repetition_penalty}."),
        io.Float.Input("low_level_length_penalty", optional=True, default=1.0, min=-10.0, max=10.0, step=0.1,
                       tooltip=f"Beam search's length penalty for the low-level caption (used with beams only). "
                               f"Official Q-Instruct: {OFFICIAL_LOW_LEVEL.length_penalty}."),
        io.Int.Input("low_level_max_new_tokens", optional=True, default=0, min=0, max=2048,
                     tooltip=f"Longest low-level caption in tokens; 0: max_new_tokens. Official Q-Instruct: "
                             f"{OFFICIAL_LOW_LEVEL.max_new_tokens}."),
    ]


def instructions(high_level_instruction: str, low_level_instruction: str, max_new_tokens: int,
                 low_level_num_beams: int, low_level_repetition_penalty: float, low_level_length_penalty: float,
                 low_level_max_new_tokens: int) -> list[tuple[str, Decoding]]:
    """The two instructions with their decoding, from the shared inputs; a bad setting names its input."""
    try:
        return dual_instructions(high_level_instruction, low_level_instruction, max_new_tokens, Decoding(
            low_level_max_new_tokens or max_new_tokens, low_level_num_beams, low_level_repetition_penalty,
            low_level_length_penalty))
    except ValueError as e:
        raise ValueError(f"{e} (the node's inputs max_new_tokens and low_level_*)") from e


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


CLIP_ROUTE = (f"Instead of mllm: {comfy_vlm.EXPECTED} (on ComfyUI releases with the Generate Text node). Captions "
              "are what Generate Text writes with sampling off: greedy, up to max_new_tokens (low_level_max_new_tokens "
              "for the low level), one image at a time (batch_size is not used); low_level_num_beams above 1 or a "
              "repetition penalty are refused. keep_loaded off offloads the CLIP's model once the captions are "
              "written; ComfyUI loads it again when the CLIP is next used.")


class XPSRCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRCaption",
            display_name="XPSR Caption",
            category=CATEGORY,
            description="Writes XPSR's two prompts for every image of a batch: a high-level caption (content) and a "
                        "low-level one (quality), with an MLLM from XPSR MLLM Loader or a CLIP whose model generates "
                        "text from images (e.g. Qwen3-VL with Load CLIP). Feed them to XPSR Dual Prompt Encode (one "
                        "prompt per image) or to any text input.",
            inputs=[XPSRMLLMType.Input("mllm", optional=True,
                                       tooltip="From XPSR MLLM Loader (a transformers model from models/LLM). Connect "
                                               "this or clip, not both."),
                    io.Image.Input("image", tooltip="The low-resolution image(s)."),
                    *_instruction_inputs(),
                    io.Clip.Input("clip", optional=True, tooltip=CLIP_ROUTE),
                    XPSRTileGridType.Input("tile_grid", optional=True,
                                           tooltip="From XPSR Tile Grid (made from this image): caption every "
                                                   "latent tile XPSR Sampler will denoise instead of the whole "
                                                   "image, one caption pair per tile, image by image in the grid's "
                                                   "order, for XPSR Dual Prompt Encode with the same grid."),
                    io.Boolean.Input("whole_image_context", optional=True, default=True,
                                     tooltip="With tile_grid: put the whole image's captions in front of each "
                                             "tile's, so a tile that shows little (sky, a wall) still carries what "
                                             "the picture is and how it is damaged; costs one caption pair more per "
                                             "image. Off: each tile's own captions only.")],
            outputs=[io.String.Output(display_name="high_level", is_output_list=True,
                                     tooltip="The content captions, one per image (or per tile with tile_grid), "
                                             "for XPSR Dual Prompt Encode's high_level."),
                     io.String.Output(display_name="low_level", is_output_list=True,
                                     tooltip="The quality captions, one per image (or per tile with tile_grid), "
                                             "for XPSR Dual Prompt Encode's low_level.")],
        )

    @classmethod
    def execute(cls, image: torch.Tensor, high_level_instruction: str, low_level_instruction: str,
                max_new_tokens: int, keep_loaded: bool, batch_size: int = DEFAULT_BATCH_SIZE,
                low_level_num_beams: int = 1, low_level_repetition_penalty: float = 1.0,
                low_level_length_penalty: float = 1.0, low_level_max_new_tokens: int = 0,
                mllm: MLLM | None = None, clip: comfy.sd.CLIP | None = None, tile_grid: TileGrid | None = None,
                whole_image_context: bool = True) -> io.NodeOutput:
        if (mllm is None) == (clip is None):
            raise ValueError(f"XPSR Caption captions with mllm (from XPSR MLLM Loader) or clip ({comfy_vlm.EXPECTED}): "
                             f"connect exactly one; {'both are' if mllm is not None else 'neither is'} connected")
        asked = instructions(high_level_instruction, low_level_instruction, max_new_tokens, low_level_num_beams,
                             low_level_repetition_penalty, low_level_length_penalty, low_level_max_new_tokens)
        if clip is not None:
            def captioner(pictures: list) -> list[list[str]]:
                return clip_caption_rows(clip, pictures, asked, keep_loaded)

            def to_picture(picture: torch.Tensor):
                return picture
        else:
            def captioner(pictures: list) -> list[list[str]]:
                return list(captions(mllm, pictures, len(pictures), asked, batch_size, keep_loaded))

            to_picture = to_pil
        rgb = to_rgb(image)
        rows = (captioner([to_picture(i) for i in rgb]) if tile_grid is None
                else caption_tiles(captioner, to_picture, rgb, tile_grid, whole_image_context))
        return io.NodeOutput([r[0] for r in rows], [r[1] for r in rows])


def clip_caption_rows(clip: comfy.sd.CLIP, pictures: list[torch.Tensor], asked: list[tuple[str, Decoding]],
                      keep_loaded: bool) -> list[list[str]]:
    """Every picture's captions (one per instruction) through the CLIP, on one progress bar."""
    comfy_vlm.require_generating_clip(clip)
    for _, decoding in asked:
        if decoding.num_beams != 1 or decoding.repetition_penalty != 1.0:
            raise ValueError(f"clip: ComfyUI's text generation decodes greedily, with no beams and no repetition "
                             f"penalty; set low_level_num_beams to 1 and low_level_repetition_penalty to 1.0 (got "
                             f"{decoding.num_beams} and {decoding.repetition_penalty}), or connect mllm from XPSR "
                             "MLLM Loader for beam search")
    bar = comfy.utils.ProgressBar(len(pictures) * len(asked))
    try:
        per_instruction = [comfy_vlm.caption_images(clip, pictures, instruction, decoding.max_new_tokens, bar)
                           for instruction, decoding in asked]
        return [list(row) for row in zip(*per_instruction, strict=True)]
    finally:
        if not keep_loaded:
            unload(clip.patcher)


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
                low_level_instruction: str, max_new_tokens: int, keep_loaded: bool,
                batch_size: int = DEFAULT_BATCH_SIZE, low_level_num_beams: int = 1,
                low_level_repetition_penalty: float = 1.0, low_level_length_penalty: float = 1.0,
                low_level_max_new_tokens: int = 0) -> io.NodeOutput:
        asked = instructions(high_level_instruction, low_level_instruction, max_new_tokens, low_level_num_beams,
                             low_level_repetition_penalty, low_level_length_penalty, low_level_max_new_tokens)
        folder = dataset_folder(dataset)
        images = list_lr_images(folder)
        jobs = [(image, targets) for image in images if any(targets := caption_targets(image, overwrite))]
        written = sum(1 for _ in write_dataset_captions(
            lambda pictures: captions(mllm, pictures, len(jobs), asked, batch_size, keep_loaded), jobs))
        summary = f"captioned {written} of {len(images)} LR images in {folder}"
        return io.NodeOutput(summary, ui={"text": [summary]})

