"""The paired training set in the official folder layout, and a batch order that a resumed run can continue.

``<root>/HR/<name>.png`` is the clean image, ``<root>/LR/<name>.png`` its degraded version
already upsampled back to the HR size, and the captions sit beside them:
``highlevel_prompt/<name>.txt`` (what the image shows), ``lowlevel_prompt_q/<name>.txt``
(the LR image's quality) and ``lowlevel_prompt_q_GT/<name>.txt`` (the HR image's quality).

As in the official ``LocalImageDataset``, with probability ``original_image_ratio`` (0.1) a
sample's control image is its HR image and its low-level prompt the HR caption, so the
ControlNet also learns what a clean input looks like. The released train.py conditions the
high-level branch on the empty string although the dataset reads the captions (mode
``empty``); the paper conditions it on the caption (mode ``caption``).

All randomness of a sample comes from (seed, epoch, index): the crop and the HR swap here,
the diffusion draws (VAE sample, noise, timestep) from ``noise_generator``. The batch order
comes from (seed, epoch), so batch ``k`` of a run is the same whether or not the run was
resumed, the same with any number of loader workers, and the same split over any number of
processes: under torchrun each rank takes its slice of the global batch, so the ranks'
batches together are the batch one process of the whole size would read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..pipeline.image import IMAGE_SUFFIXES
from .config import ConfigError

log = logging.getLogger(__name__)

HIGHLEVEL_DIR = "highlevel_prompt"
LOWLEVEL_DIR = "lowlevel_prompt_q"
LOWLEVEL_GT_DIR = "lowlevel_prompt_q_GT"


@dataclass(frozen=True)
class PairRecord:
    name: str
    hr: Path
    lr: Path
    highlevel: Path
    lowlevel: Path
    lowlevel_gt: Path


def read_caption(path: Path) -> str:
    """The first line of a caption file, stripped; an empty file is the empty prompt (as in the official reader)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def scan_pairs(roots: tuple[str, ...] | list[str], need_highlevel: bool) -> list[PairRecord]:
    """Every HR/LR pair under the roots, with its caption files; missing files are reported by path."""
    records = []
    for root in map(Path, roots):
        if not (root / "HR").is_dir() or not (root / "LR").is_dir():
            raise ConfigError(f"train_data_dir {root}: expected the official layout <root>/HR/<name>.png, "
                              f"<root>/LR/<name>.png and <root>/{LOWLEVEL_DIR}/<name>.txt (HR/ and LR/ are missing)")
        hr, lr = _images(root / "HR"), _images(root / "LR")
        if not hr:
            raise ConfigError(f"{root / 'HR'}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for name, hr_path in hr.items():
            if name not in lr:
                raise ConfigError(f"{hr_path}: no LR partner; expected {root / 'LR' / hr_path.name}")
            record = PairRecord(name, hr_path, lr[name], root / HIGHLEVEL_DIR / f"{name}.txt",
                                root / LOWLEVEL_DIR / f"{name}.txt", root / LOWLEVEL_GT_DIR / f"{name}.txt")
            required = [record.lowlevel] + ([record.highlevel] if need_highlevel else [])
            for caption in required:
                if not caption.is_file():
                    raise ConfigError(f"{caption}: caption file missing for {hr_path}")
            records.append(record)
    without_gt = sum(not r.lowlevel_gt.is_file() for r in records)
    if without_gt:
        log.info("%d of %d pairs have no %s/<name>.txt; when their HR image is the control image they use the LR "
                 "image's low-level caption", without_gt, len(records), LOWLEVEL_GT_DIR)
    return records


def _generator(sequence: np.random.SeedSequence) -> torch.Generator:
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0]))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's random choices, independent of the order samples are loaded in."""
    return _generator(np.random.SeedSequence([seed, epoch, index]))


def noise_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample's diffusion draws: a stream of its own beside ``sample_generator``'s, so the
    draws depend on the sample alone, not on which process or batch position trains it."""
    return _generator(np.random.SeedSequence([seed, epoch, index], spawn_key=(1,)))


def _load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class PairedDataset(Dataset):
    """Samples keyed by (index, epoch): control image in [0, 1], HR target in [-1, 1], both prompts."""

    def __init__(self, roots: tuple[str, ...] | list[str], resolution: int, highlevel_prompt: str,
                 original_image_ratio: float, seed: int):
        self.records = scan_pairs(roots, need_highlevel=highlevel_prompt == "caption")
        self.resolution = resolution
        self.highlevel_prompt = highlevel_prompt
        self.original_image_ratio = original_image_ratio
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        record = self.records[index]
        g = sample_generator(self.seed, epoch, index)
        hr, lr = _load_rgb(record.hr), _load_rgb(record.lr)
        if hr.shape != lr.shape:
            raise ConfigError(f"{record.lr}: size {tuple(lr.shape[1:])} differs from its HR image {record.hr} "
                              f"{tuple(hr.shape[1:])}; LR images must already be upsampled to the HR size")
        hr, lr = self._crop(record, hr, lr, g)
        use_hr = bool(torch.rand((), generator=g) < self.original_image_ratio)
        lowlevel = record.lowlevel
        if use_hr and record.lowlevel_gt.is_file():
            lowlevel = record.lowlevel_gt
        high = read_caption(record.highlevel) if self.highlevel_prompt == "caption" else ""
        return {
            "key": (index, epoch),
            "control": hr if use_hr else lr,
            "target": hr * 2 - 1,
            "highlevel_prompt": high,
            "lowlevel_prompt": read_caption(lowlevel),
        }

    def _crop(self, record: PairRecord, hr: torch.Tensor, lr: torch.Tensor,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.resolution
        h, w = hr.shape[1:]
        if h < size or w < size:
            raise ConfigError(f"{record.hr}: {h}x{w} is smaller than the training resolution {size}")
        top = int(torch.randint(0, h - size + 1, (), generator=g))
        left = int(torch.randint(0, w - size + 1, (), generator=g))
        window = (slice(None), slice(top, top + size), slice(left, left + size))
        return hr[window], lr[window]


def collate(samples: list[dict]) -> dict:
    return {
        "keys": [s["key"] for s in samples],
        "control": torch.stack([s["control"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "highlevel_prompt": [s["highlevel_prompt"] for s in samples],
        "lowlevel_prompt": [s["lowlevel_prompt"] for s in samples],
    }


class ResumableBatchSampler(Sampler):
    """This rank's batches of (index, epoch) keys from batch ``start`` on.

    Each epoch is a fresh permutation cut into global batches of ``batch_size x world_size``
    (the last partial one dropped, so every batch has the configured size); rank ``r`` reads
    slice ``r`` of each. The order depends only on the seed and the batch number, so a resumed
    run reads what an uninterrupted one would, and one process with ``world_size`` times the
    batch reads the union of the ranks' batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if size < batch_size * world_size:
            processes = f" x {world_size} processes = {batch_size * world_size}" if world_size > 1 else ""
            raise ConfigError(f"the training set has {size} pairs, fewer than train_batch_size {batch_size}"
                              f"{processes}")
        self.size, self.batch_size, self.seed, self.start = size, batch_size, seed, start
        self.rank, self.world_size = rank, world_size
        self.per_epoch = size // (batch_size * world_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start
        width = self.batch_size * self.world_size
        while True:
            epoch, position = divmod(batch, self.per_epoch)
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            first = position * width + self.rank * self.batch_size
            yield [(int(i), epoch) for i in order[first:first + self.batch_size]]
            batch += 1
