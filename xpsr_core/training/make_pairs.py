"""Make XPSR training pairs from a folder of HR images, as the official utils_data/make_train.py does.

    python -m xpsr_core.training.make_pairs --hr photos/ --out trainset/ [--size 512] [--scale 4] [--seed 0]
        [--per-image N]

writes ``<out>/HR/<name>.png`` (the USM-sharpened crop) and ``<out>/LR/<name>.png`` (its
degraded LR, bicubic-upsampled back to the crop size), the layout the official training reads.
With ``--per-image N`` above 1 each image gives N pairs named ``<name>_<k>.png``. Each pair's
randomness comes from the seed and the pair's name alone, so a pair does not change when other
images are added to the folder or the folder is processed in another order.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..pipeline.image import IMAGE_SUFFIXES
from .degradation import DegradationConfig, make_pair, minimum_size


class PairsError(ValueError):
    """Input that cannot make pairs; the message names the folder or file and what was expected."""


def find_images(folder: Path, size: int) -> list[Path]:
    """The folder's images, sorted, each checked (header only) to hold a size x size crop before any work starts."""
    if not folder.exists():
        raise PairsError(f"HR folder {folder} does not exist; expected a folder of HR images")
    if not folder.is_dir():
        raise PairsError(f"HR folder {folder} is not a folder; expected a folder of HR images")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PairsError(f"HR folder {folder} has no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    for path in images:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as error:
            raise PairsError(f"HR image {path} cannot be read as an image ({error})") from error
        if width < size or height < size:
            raise PairsError(f"HR image {path} is {width}x{height} (width x height); expected at least "
                             f"{size}x{size} for --size {size}")
    return images


def plan(images: Sequence[Path], per_image: int) -> list[tuple[Path, list[str]]]:
    """Each image with the names of its pairs; two images that would write one name are refused, not overwritten."""
    owners: dict[str, Path] = {}
    for path in images:
        if path.stem in owners:
            raise PairsError(f"HR images {owners[path.stem]} and {path} would both be written as {path.stem}.png; "
                             "expected one image per name")
        owners[path.stem] = path
    if per_image == 1:
        return [(path, [path.stem]) for path in images]
    return [(path, [f"{path.stem}_{k}" for k in range(per_image)]) for path in images]


def pair_generator(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the seed and the output name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def load_rgb(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) float in [0, 1]: upright, alpha dropped, gray expanded, as cv2.imread reads it."""
    try:
        with Image.open(path) as image:
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except OSError as error:  # a header that reads but a body that does not (a truncated file)
        raise PairsError(f"HR image {path} cannot be read as an image ({error})") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] as an 8-bit PNG, rounded like OpenCV's float-to-uint8 write."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(array).save(path)


def make_pairs(hr_folder: Path, out_folder: Path, size: int = 512, scale: int = 4, seed: int = 0,
               per_image: int = 1) -> int:
    """Write every pair; returns how many. Every input is checked before the first file is written."""
    if scale < 1:
        raise PairsError(f"--scale is {scale}; expected a positive integer")
    config = DegradationConfig(scale=scale)
    least = minimum_size(config)
    if size % scale or size < least:
        raise PairsError(f"--size is {size}; expected a multiple of --scale {scale} of at least {least}")
    if per_image < 1:
        raise PairsError(f"--per-image is {per_image}; expected at least 1")
    jobs = plan(find_images(hr_folder, size), per_image)
    (out_folder / "HR").mkdir(parents=True, exist_ok=True)
    (out_folder / "LR").mkdir(parents=True, exist_ok=True)
    for path, names in jobs:
        image = load_rgb(path)
        for name in names:
            hr, lr = make_pair(image, size, config, pair_generator(seed, name))
            save_png(hr, out_folder / "HR" / f"{name}.png")
            save_png(lr, out_folder / "LR" / f"{name}.png")
    return sum(len(names) for _, names in jobs)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; refused input exits with status 2 and one line naming it, as argparse's own errors do."""
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.training.make_pairs", description=__doc__.split("\n")[0])
    parser.add_argument("--hr", type=Path, required=True, help="folder of HR images (not searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder; HR/ and LR/ are made inside")
    parser.add_argument("--size", type=int, default=512, help="HR crop size (official: 512)")
    parser.add_argument("--scale", type=int, default=4, help="super-resolution factor (official: 4)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same pairs")
    parser.add_argument("--per-image", type=int, default=1,
                        help="pairs per image (the official script's epochs); above 1 names get a _<k> suffix")
    args = parser.parse_args(argv)
    try:
        count = make_pairs(args.hr, args.out, args.size, args.scale, args.seed, args.per_image)
    except PairsError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} pairs to {args.out / 'HR'} and {args.out / 'LR'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
