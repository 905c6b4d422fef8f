"""Splitting a dataset command over the processes torchrun starts, and one summary of what they did.

``torchrun --nproc_per_node N <command>`` starts N copies with RANK, WORLD_SIZE and LOCAL_RANK set. Each copy
takes every N-th file by name, works on its own device (cuda:LOCAL_RANK, or the CPU), and rank 0 gathers the
copies' reports over gloo (the reports are small Python objects, so no GPU collective is involved) and prints one
summary. Without torchrun the command is one process of one rank and never touches torch.distributed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

SEED_MAX = 0xFFFFFFFFFFFFFFFF
"""The largest seed ComfyUI's samplers take."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def label(self) -> str:
        """How progress lines name the process: empty without torchrun."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def ranks_from_env() -> Ranks:
    """The ranks torchrun sets in the environment; one rank of one when they are absent."""
    try:
        ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                      int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers as torchrun sets them: {e}") from e
    if not 0 <= ranks.rank < ranks.world_size:
        raise ValueError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world_size}; expected 0 <= RANK < WORLD_SIZE")
    return ranks


def start(ranks: Ranks) -> None:
    """Join torchrun's process group (gloo, for the summary) when there is more than one process."""
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("gloo")


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device(ranks: Ranks, cpu: bool) -> torch.device:
    """cuda:LOCAL_RANK where a GPU is asked for and present, else the CPU (all ranks share it)."""
    return torch.device(f"cuda:{ranks.local_rank}") if not cpu and torch.cuda.is_available() else torch.device("cpu")


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share: every world_size-th item from its rank on, so the shards do not depend on timing."""
    return list(items[ranks.rank::ranks.world_size])


def image_seed(seed: int, name: str) -> int:
    """The seed of one image, from the run's seed and the image's file name: equal whichever rank runs it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MAX


@dataclass
class Report:
    """What one rank did: the files done with their seconds, those skipped, those that failed with why."""

    rank: int = 0
    done: list[tuple[str, float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def finish(self) -> Report:
        self.seconds = time.perf_counter() - self.started
        return self


def gather(report: Report, ranks: Ranks) -> list[Report] | None:
    """Every rank's report at rank 0 (None on the others); waits for all ranks, so it is also the barrier."""
    if not ranks.distributed:
        return [report]
    reports: list[Report] | None = [Report() for _ in range(ranks.world_size)] if ranks.rank == 0 else None
    dist.gather_object(report, reports, dst=0)
    return reports


def finish(report: Report, ranks: Ranks, verb: str, unit: str) -> int:
    """The end of a sharded command: rank 0 prints every rank's summary; the exit code is 1 if anything failed."""
    reports = gather(report, ranks)
    stop()
    if reports is None:
        return 0
    print(summary(reports, verb, unit), flush=True)
    return 1 if any(r.failed for r in reports) else 0


def summary(reports: list[Report], verb: str, unit: str) -> str:
    """One paragraph: how many were done, skipped and failed (each failure with its reason), and the time."""
    done = [seconds for r in reports for _, seconds in r.done]
    skipped = sum(len(r.skipped) for r in reports)
    failed = sorted(f for r in reports for f in r.failed)
    wall = max(r.seconds for r in reports)
    lines = [f"{verb} {len(done)} {unit}s on {len(reports)} rank{'s' if len(reports) > 1 else ''} in {wall:.1f} s"
             + (f": {sum(done) / len(done):.2f} s per {unit} on a rank, {wall / len(done):.2f} s per {unit} overall"
                if done else ""),
             f"{skipped} skipped (already done), {len(failed)} failed"]
    lines += [f"  failed: {name}: {reason}" for name, reason in failed]
    return "\n".join(lines)
