"""The captioning instructions and the caption files of the official XPSR datasets.

The official training and test data keep one caption per image and prompt kind, next to the LR
images::

    <set>/LR/<name>.png
    <set>/highlevel_prompt/<name>.txt     what the image shows (LLaVA)
    <set>/lowlevel_prompt_q/<name>.txt    its quality (Q-Instruct)

Each file holds one line. Captions written here can be read by the official scripts and the other
way round. Per-tile captions (one per latent tile of XPSR Sampler, for large images) sit beside
them, one caption per line in the tile grid's order::

    <set>/highlevel_prompt/<name>.tiles.txt
    <set>/lowlevel_prompt_q/<name>.tiles.txt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..pipeline.image import IMAGE_SUFFIXES

HIGH_LEVEL_INSTRUCTION = "Please provide a descriptive summary of the content of this image."
"""What the official script asks LLaVA-1.5 for the high-level caption."""

LOW_LEVEL_INSTRUCTION = (
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, noise, "
    "and lighting."
)
"""The low-level instruction given in the paper."""

OFFICIAL_LOW_LEVEL_INSTRUCTION = "Describe and evaluate the quality of the image."
"""What the official Q-Instruct script actually sends for the low-level caption."""

HIGH_LEVEL_FOLDER = "highlevel_prompt"
LOW_LEVEL_FOLDER = "lowlevel_prompt_q"
LR_FOLDER = "LR"
CAPTION_SUFFIX = ".txt"
TILE_CAPTIONS_SUFFIX = ".tiles.txt"


@dataclass(frozen=True)
class CaptionPaths:
    """The two caption files that belong to one LR image."""

    high_level: Path
    low_level: Path


def caption_paths(lr_image: str | Path, suffix: str = CAPTION_SUFFIX) -> CaptionPaths:
    """Caption files for <set>/LR/<name>.<ext>: <set>/highlevel_prompt/<name>.txt and <set>/lowlevel_prompt_q/
    (<name>.tiles.txt with ``TILE_CAPTIONS_SUFFIX``).

    The set is the LR folder's parent whatever that folder is called, so renamed LR folders
    (LR_x4, lq) keep working.
    """
    lr_image = Path(lr_image)
    dataset = lr_image.parent.parent
    name = lr_image.stem + suffix
    return CaptionPaths(high_level=dataset / HIGH_LEVEL_FOLDER / name, low_level=dataset / LOW_LEVEL_FOLDER / name)


def read_caption(path: str | Path) -> str:
    """The caption in a file, as the official reader takes it: the first line, leading spaces removed.

    An empty file gives "" as in the official reader. A missing file raises FileNotFoundError naming
    it: a dataset with a missing caption is incomplete, and training or testing on it silently with an
    empty prompt would hide that. Check ``path.is_file()`` first where a missing caption is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    return path.read_text(encoding="utf-8").split("\n")[0].lstrip()


def read_tile_captions(path: str | Path) -> list[str]:
    """The per-tile captions in a file: every line, each as the official reader takes a caption (leading spaces
    removed); a final line break ends the last caption rather than starting an empty one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"per-tile caption file {path} does not exist")
    lines = [line.lstrip() for line in path.read_text(encoding="utf-8").splitlines()]
    if not lines:
        raise ValueError(f"per-tile caption file {path} is empty; expected one caption per line, one per tile")
    return lines


def write_caption(path: str | Path, caption: str) -> Path:
    """Write a caption as the one line the official reader takes, creating the caption folder.

    Line breaks become spaces, since everything after the first line would be lost on reading.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(caption.splitlines()).strip() + "\n", encoding="utf-8")
    return path


def list_lr_images(dataset: str | Path) -> list[Path]:
    """The images in <dataset>/LR, sorted by name, so captions are written in a stable order."""
    lr_folder = Path(dataset) / LR_FOLDER
    if not lr_folder.is_dir():
        raise FileNotFoundError(f"{dataset} has no {LR_FOLDER} folder: expected the LR images in {lr_folder}")
    return sorted(p for p in lr_folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
