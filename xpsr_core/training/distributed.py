"""Training over several processes started by torchrun, with torch.distributed's own machinery.

``torchrun --nproc_per_node N [--nnodes M ...] -m xpsr_core.training --config ...`` starts one
process per device with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each
process joins the process group (NCCL between GPUs, gloo between CPU processes) and trains on
cuda:LOCAL_RANK or the CPU. Without torchrun none of those variables is set and the run is the
single process it always was; it never touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: one process of one unless a process group is running."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, the loss log and the run's config; the others only train."""
        return self.rank == 0


def torchrun_ranks(env: Mapping[str, str] = os.environ) -> Ranks | None:
    """The ranks torchrun put in the environment, or None outside torchrun; a partial set is an error."""
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    if not present:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise ConfigError(f"the environment sets {', '.join(present)} but not {', '.join(missing)}; start a "
                          "distributed run with torchrun (it sets all of them) or unset them for one process")
    try:
        ranks = Ranks(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), distributed=True)
    except ValueError as e:
        raise ConfigError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers as torchrun sets them ({e})") from e
    if not 0 <= ranks.rank < ranks.world_size:
        raise ConfigError(f"RANK {ranks.rank} is outside WORLD_SIZE {ranks.world_size}")
    return ranks


def current_ranks() -> Ranks:
    """The ranks of the running process group (LOCAL_RANK from torchrun's environment), or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        raise ConfigError("a process group is running but LOCAL_RANK is not set; start the run with torchrun")
    return Ranks(dist.get_rank(), int(local_rank), dist.get_world_size(), distributed=True)


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    """The ``device`` key as a torch device, cuda:LOCAL_RANK in a distributed run; asking for CUDA without one is
    a config error, not a silent CPU run."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'device' is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "cuda" and ranks.distributed:
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK is {ranks.local_rank} but this node has {torch.cuda.device_count()} CUDA "
                              "devices; start at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", ranks.local_rank)
    return torch.device(name)


@contextmanager
def process_group(device: str, env: Mapping[str, str] = os.environ) -> Iterator[Ranks]:
    """Join torchrun's process group for the block (NCCL for CUDA, gloo for the CPU) and leave it after; outside
    torchrun, one process and no process group."""
    ranks = torchrun_ranks(env)
    if ranks is None:
        yield Ranks()
        return
    where = resolve_device(device, ranks)
    if where.type == "cuda":
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
        dist.init_process_group("gloo")
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
