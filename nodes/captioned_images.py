"""XPSR Load Captioned Images: a dataset's LR images with the caption files beside them, for a graph.

The released checkpoint was trained with captions of two models, the low-level one (Q-Instruct
InternLM-XComposer-VL) being a model that cannot run in ComfyUI's environment. Whoever wants the official
captions writes them once with the official scripts (or XPSR Caption Dataset) into the official layout and
reads them here: the same IMAGE batch and STRING lists as XPSR Caption gives, so XPSR Dual Prompt Encode
takes them unchanged. Per-tile captions (``<name>.tiles.txt``, one line per tile) come as one list of every
image's tiles, for Dual Prompt Encode with a tile grid. The folder obeys the shared-server rules of ``access``.
"""

from __future__ import annotations

from dataclasses import astuple
from pathlib import Path

import numpy as np
import torch

from comfy_api.latest import io

from ..xpsr_core.captioning.caption_dataset import open_rgb
from ..xpsr_core.captioning.captions import (
    CAPTION_SUFFIX,
    TILE_CAPTIONS_SUFFIX,
    caption_paths,
    list_lr_images,
    read_caption,
    read_tile_captions,
)
from .access import allowed_path, dataset_folder
from .common import CATEGORY

MISSING_CAPTION_CHOICES = ("error", "empty")
CAPTION_CHOICES = {"whole image": CAPTION_SUFFIX, "per tile": TILE_CAPTIONS_SUFFIX}


def load_caption(path: Path, missing_caption: str) -> str:
    """A caption by the official reading rule; a missing file is an error naming it, or "" when asked for."""
    allowed_path(path, f"caption file {str(path)!r}")
    if missing_caption == "empty" and not path.is_file():
        return ""
    try:
        return read_caption(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: each LR image needs its caption in the official layout; set missing_caption "
                                "to empty to give a missing caption as an empty prompt") from e


def load_tile_captions(paths: list[Path]) -> list[str]:
    """Every image's per-tile captions in one list, image by image; every image needs as many (one grid)."""
    for path in paths:
        allowed_path(path, f"caption file {str(path)!r}")
    per_image = [read_tile_captions(p) for p in paths]
    counts = {len(c) for c in per_image}
    if len(counts) > 1:
        listed = ", ".join(f"{p.name} {len(c)}" for p, c in zip(paths, per_image, strict=True))
        raise ValueError(f"the per-tile caption files hold different numbers of captions ({listed}); expected one "
                         "per tile of the same grid for every image")
    return [caption for captions in per_image for caption in captions]


def load_image(path: Path) -> torch.Tensor:
    """An LR image as a one-image IMAGE (1, H, W, 3), with the pixels the captioning scripts saw."""
    allowed_path(path, f"LR image {str(path)!r}")
    return torch.from_numpy(np.asarray(open_rgb(path), dtype=np.float32) / 255.0)[None]


def select(images: list[Path], start: int, count: int, dataset: str) -> list[Path]:
    """The images from ``start`` on, ``count`` of them (0: all), refused when the range is empty."""
    chosen = images[start:start + count] if count else images[start:]
    if not chosen:
        raise ValueError(f"dataset {dataset!r} has {len(images)} LR images, none from start {start}: expected start "
                         f"below {len(images)}")
    return chosen


def one_batch(images: list[torch.Tensor], paths: list[Path]) -> torch.Tensor:
    """The images as one IMAGE batch, which needs one size: otherwise an error listing the sizes."""
    sizes = {tuple(i.shape[1:3]) for i in images}
    if len(sizes) > 1:
        listed = ", ".join(f"{p.name} {i.shape[2]}x{i.shape[1]}" for p, i in zip(paths, images, strict=True))
        raise ValueError(f"the LR images chosen have different sizes ({listed}) and one IMAGE batch needs one size: "
                         "choose images of one size with start and count, or count 1 to upscale one image per "
                         "queued prompt")
    return torch.cat(images)


class XPSRLoadCaptionedImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRLoadCaptionedImages",
            display_name="XPSR Load Captioned Images",
            category=CATEGORY,
            description="Loads LR images with their captions in the official layout (<folder>/LR/<name>.png, "
                        "<folder>/highlevel_prompt/<name>.txt, <folder>/lowlevel_prompt_q/<name>.txt), as the "
                        "official captioning scripts or XPSR Caption Dataset write them: an IMAGE batch and one "
                        "caption per image, like XPSR Caption, for XPSR Dual Prompt Encode. Captions are read as the "
                        "official test script reads them (first line, leading spaces removed). The folder lies in "
                        "ComfyUI's input or output folder, or in a folder the server's owner lists in "
                        "XPSR_DATASET_DIRS.",
            inputs=[
                io.String.Input("dataset", default="xpsr_dataset",
                                tooltip="The folder that holds LR/, highlevel_prompt/ and lowlevel_prompt_q/: "
                                        "relative to ComfyUI's input folder, or absolute inside the input or output "
                                        "folder or a folder listed in XPSR_DATASET_DIRS."),
                io.Int.Input("start", default=0, min=0, max=1_000_000,
                             tooltip="The first image to load, counted from 0 in name order."),
                io.Int.Input("count", default=0, min=0, max=1_000_000,
                             tooltip="How many images to load from start; 0: all the rest. One batch needs images "
                                     "of one size: use 1 for datasets of mixed sizes."),
                io.Combo.Input("missing_caption", options=list(MISSING_CAPTION_CHOICES), default="error",
                               tooltip="error: a missing caption file stops the run, naming the file. empty: it "
                                       "gives an empty prompt, as an empty file does in the official script."),
                io.Combo.Input("captions", options=list(CAPTION_CHOICES), default="whole image", optional=True,
                               tooltip="whole image: <name>.txt, one caption per image. per tile: <name>.tiles.txt "
                                       "beside it, one caption per line for each of XPSR Sampler's latent tiles in "
                                       "XPSR Tile Grid's order (column by column), for XPSR Dual Prompt Encode with "
                                       "that tile_grid; these files must exist."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The LR images as one batch, in name order."),
                io.String.Output(display_name="high_level", is_output_list=True,
                                 tooltip="The content captions (highlevel_prompt/), one per image, for XPSR Dual "
                                         "Prompt Encode's high_level."),
                io.String.Output(display_name="low_level", is_output_list=True,
                                 tooltip="The quality captions (lowlevel_prompt_q/), one per image, for XPSR Dual "
                                         "Prompt Encode's low_level."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset: str, start: int, count: int, missing_caption: str,
                           captions: str = "whole image") -> list:
        """The chosen files' sizes and times: an edited caption or image is read again instead of coming from
        ComfyUI's cache, as Load Image does for its file."""
        paths = select(list_lr_images(dataset_folder(dataset)), start, count, dataset)
        suffix = CAPTION_CHOICES.get(captions, CAPTION_SUFFIX)
        files = [f for p in paths for f in (p, *astuple(caption_paths(p, suffix)))]
        return [(str(f), f.stat().st_mtime_ns, f.stat().st_size) if f.is_file() else (str(f),) for f in files]

    @classmethod
    def execute(cls, dataset: str, start: int, count: int, missing_caption: str,
                captions: str = "whole image") -> io.NodeOutput:
        if missing_caption not in MISSING_CAPTION_CHOICES:
            raise ValueError(f"missing_caption is {missing_caption!r}; expected one of {MISSING_CAPTION_CHOICES}")
        if captions not in CAPTION_CHOICES:
            raise ValueError(f"captions is {captions!r}; expected one of {list(CAPTION_CHOICES)}")
        paths = select(list_lr_images(dataset_folder(dataset)), start, count, dataset)
        files = [caption_paths(p, CAPTION_CHOICES[captions]) for p in paths]
        if captions == "per tile":
            high_level = load_tile_captions([f.high_level for f in files])
            low_level = load_tile_captions([f.low_level for f in files])
        else:
            high_level = [load_caption(f.high_level, missing_caption) for f in files]
            low_level = [load_caption(f.low_level, missing_caption) for f in files]
        return io.NodeOutput(one_batch([load_image(p) for p in paths], paths), high_level, low_level)
