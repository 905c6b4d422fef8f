"""Caption a dataset in the official layout.

    python -m xpsr_core.captioning.caption_dataset --dataset SET --model FOLDER

For SET/LR/<name>.png it writes SET/highlevel_prompt/<name>.txt and SET/lowlevel_prompt_q/<name>.txt with a local
vision-language model, many images per generate call, leaving caption files that exist alone unless --overwrite.
Under ``torchrun --nproc_per_node N`` every process captions every N-th image on its own GPU (cuda:LOCAL_RANK) and
rank 0 prints one summary. The XPSR Caption Dataset node writes its files with the same functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from .. import sharding
from .captions import HIGH_LEVEL_INSTRUCTION, LOW_LEVEL_INSTRUCTION, caption_paths, list_lr_images, write_caption
from .mllm import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    OFFICIAL_LOW_LEVEL,
    CaptionModelError,
    Decoding,
    caption_rows,
    load_caption_model,
    out_of_memory_advice,
)

Job = tuple[Path, list[Path | None]]
"""An LR image and its caption files to write (high level, low level), None for one that stays."""


def open_rgb(path: Path) -> Image.Image:
    """An image file as RGB pixels, read as the official captioning scripts read it (no EXIF rotation)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def caption_targets(image: Path, overwrite: bool) -> list[Path | None]:
    """The LR image's caption files to write, high level then low level; None for one that stays.

    A file that exists (a dangling symlink too) is someone's caption and stays unless overwrite is on; an image
    missing one caption is captioned for both and only the missing file is written.
    """
    paths = caption_paths(image)
    return [p if overwrite or not os.path.lexists(p) else None for p in (paths.high_level, paths.low_level)]


def dual_instructions(high_level: str, low_level: str, max_new_tokens: int, low_level_decoding: Decoding,
                      ) -> list[tuple[str, Decoding]]:
    """XPSR's two instructions with their decoding: the high level greedy, the low level as asked."""
    return [(high_level, Decoding(max_new_tokens=max_new_tokens)), (low_level, low_level_decoding)]


def write_dataset_captions(rows: Callable[[Iterable[Image.Image]], Iterator[list[str]]], jobs: list[Job],
                           on_unreadable: Callable[[Path, Exception], None] | None = None) -> Iterator[Path]:
    """Write each image's captions as soon as ``rows`` gives them, yielding the image once its files are written.

    ``rows`` turns pictures into caption rows (high level, low level), e.g. mllm.caption_rows with a model bound.
    An image that cannot be read goes to on_unreadable and the others go on; without it the error propagates.
    """
    readable: list[Job] = []

    def pictures() -> Iterator[Image.Image]:
        for image, targets in jobs:
            try:
                picture = open_rgb(image)
            except OSError as e:
                if on_unreadable is None:
                    raise
                on_unreadable(image, e)
                continue
            readable.append((image, targets))
            yield picture

    for index, row in enumerate(rows(pictures())):
        image, targets = readable[index]
        for target, caption in zip(targets, row, strict=True):
            if target is not None:
                write_caption(target, caption)
        yield image


def caption_shard(model_folder: Path, dataset: Path, args: argparse.Namespace, ranks: sharding.Ranks,
                  ) -> sharding.Report:
    """Caption this rank's share of the dataset's LR images, one progress line per image."""
    report = sharding.Report(rank=ranks.rank)
    images = sharding.shard(list_lr_images(dataset), ranks)
    jobs = []
    for image in images:
        targets = caption_targets(image, args.overwrite)
        if any(targets):
            jobs.append((image, targets))
        else:
            report.skipped.append(image.name)
    if not jobs:
        return report.finish()
    device = sharding.device(ranks, args.cpu)
    dtype = {"auto": torch.float16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = load_caption_model(model_folder, dtype, args.trust_remote_code)
    model.model.to(device)
    instructions = dual_instructions(args.high_level_instruction, args.low_level_instruction, args.max_new_tokens,
                                     Decoding(args.low_level_max_new_tokens or args.max_new_tokens,
                                              args.low_level_num_beams, args.low_level_repetition_penalty,
                                              args.low_level_length_penalty))
    last = time.perf_counter()

    def unreadable(image: Path, error: Exception) -> None:
        report.failed.append((image.name, f"unreadable image: {error}"))

    try:
        written = write_dataset_captions(lambda pictures: caption_rows(model, pictures, instructions, args.batch_size),
                                         jobs, unreadable)
        for count, image in enumerate(written, 1):
            now = time.perf_counter()
            report.done.append((image.name, now - last))
            print(f"{ranks.label()}[{count}/{len(jobs)}] {image.name}: captions written ({now - last:.2f} s)",
                  flush=True)
            last = now
    except torch.OutOfMemoryError as e:
        raise MemoryError(out_of_memory_advice(model)) from e
    return report.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.captioning.caption_dataset",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, type=Path, help="the folder that holds LR/")
    parser.add_argument("--model", required=True, type=Path, help="a Hugging Face vision-language model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace caption files that exist")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images captioned together (default {DEFAULT_BATCH_SIZE}); out of memory halves it")
    parser.add_argument("--high-level-instruction", default=HIGH_LEVEL_INSTRUCTION)
    parser.add_argument("--low-level-instruction", default=LOW_LEVEL_INSTRUCTION)
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest caption in tokens (official LLaVA: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--low-level-num-beams", type=int, default=1,
                        help=f"beams of the low-level caption (official Q-Instruct: {OFFICIAL_LOW_LEVEL.num_beams})")
    parser.add_argument("--low-level-repetition-penalty", type=float, default=1.0,
                        help=f"official Q-Instruct: {OFFICIAL_LOW_LEVEL.repetition_penalty}")
    parser.add_argument("--low-level-length-penalty", type=float, default=1.0,
                        help=f"used with beams; official Q-Instruct: {OFFICIAL_LOW_LEVEL.length_penalty}")
    parser.add_argument("--low-level-max-new-tokens", type=int, default=0,
                        help=f"0: --max-new-tokens; official Q-Instruct: {OFFICIAL_LOW_LEVEL.max_new_tokens}")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="auto: fp16 on a GPU, fp32 on the CPU")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the Python code shipped in --model")
    parser.add_argument("--cpu", action="store_true", help="caption on the CPU")
    args = parser.parse_args(argv)
    if not (args.dataset / "LR").is_dir():
        parser.error(f"--dataset {args.dataset} has no LR folder: expected the LR images in {args.dataset / 'LR'}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    ranks = sharding.ranks_from_env()
    sharding.start(ranks)
    try:
        report = caption_shard(args.model, args.dataset, args, ranks)
    except (CaptionModelError, ValueError, MemoryError) as e:
        print(f"{ranks.label()}error: {e}", file=sys.stderr)
        report = sharding.Report(rank=ranks.rank, failed=[("(all)", str(e))]).finish()
    return sharding.finish(report, ranks, "captioned", "image")


if __name__ == "__main__":
    sys.exit(main())
