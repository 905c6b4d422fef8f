"""The training loop: official initialisation, AdamW with warm-up, accumulation, mixed precision, checkpoints, resume.

One *step* is one optimizer update (``gradient_accumulation_steps`` batches), as in the
official accelerate loop; checkpoints, the warm-up and ``max_train_steps`` count steps. A
resumed run continues the same run: the trainable weights, optimizer, schedule and loss
scaler are restored, each sample's random draws depend only on the seed and the sample, and
the batch order only on the seed and the batch number, so the losses after a resume equal
those of an uninterrupted run.

Under torchrun (see ``distributed``) the trainable modules are wrapped in
DistributedDataParallel (the frozen SD1.5 base is not), each rank reads its slice of every
global batch, the gradients are all-reduced on the last micro-step of an accumulation only
(``no_sync`` on the others), and the effective batch is ``train_batch_size x
gradient_accumulation_steps x world size``. Each sample draws its own noise, so N ranks with
batch b train as one process with batch N x b does. Rank 0 alone writes the checkpoints, the
loss log and the run's config; every rank resumes from the checkpoint rank 0 names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..models.attention import set_gradient_checkpointing
from ..models.conditional_attention import ConditionalAttention
from ..weights.checkpoint import load_checkpoint
from ..weights.sd15 import SD15Base, load_sd15
from .checkpoints import list_checkpoints, prune_checkpoints, read_training_state, write_checkpoint
from .config import ConfigError, TrainConfig
from .data import PairedDataset, ResumableBatchSampler, collate, noise_generator
from .distributed import current_ranks, resolve_device
from .from_unet import controlnet_from_unet
from .objective import LossSettings, LossTerms, XPSRTrainable, batch_loss, training_alphas_cumprod

log = logging.getLogger(__name__)

LOSS_LOG = "loss_log.jsonl"
AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def constant_with_warmup(warmup_steps: int) -> Callable[[int], float]:
    """diffusers' ``constant_with_warmup``: a linear ramp from 0 over ``warmup_steps`` updates, then constant."""
    def factor(step: int) -> float:
        return step / max(1, warmup_steps) if step < warmup_steps else 1.0
    return factor


class LossLog:
    """The loss log as JSON lines (step, loss, mse, dfc, lr); a resumed run drops the records after its checkpoint."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= keep_until]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Trainer:
    """XPSR training on a frozen SD1.5 base; ``base`` may be passed in when already loaded. Inside a running
    process group (torchrun, see ``distributed.process_group``) it is one rank of a distributed run."""

    def __init__(self, config: TrainConfig, base: SD15Base | None = None):
        self.config = config
        self.ranks = current_ranks()
        if config.shard_optimizer_state and not self.ranks.distributed:
            raise ConfigError("'shard_optimizer_state' shards AdamW's state over the processes of a torchrun run, "
                              "and this run is one process; start it with torchrun --nproc_per_node N or set the "
                              "key to false")
        self.device = resolve_device(config.device, self.ranks)
        self.output_dir = Path(config.output_dir)
        self.dataset = PairedDataset(config.train_data_dir, config.resolution, config.highlevel_prompt,
                                     config.original_image_ratio, config.seed)
        if base is None:
            base = load_sd15(config.pretrained_model, configs=config.base_configs, tokenizer=config.tokenizer)
        self.base = base.requires_grad_(False).eval().to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            controlnet = controlnet_from_unet(self.base.unet)
            conditional = ConditionalAttention(self.base.unet.config)  # random init, as diffusers
        self.trainable = XPSRTrainable(controlnet, conditional).to(self.device).train()
        set_gradient_checkpointing(self.trainable, config.gradient_checkpointing)
        set_gradient_checkpointing(self.base.unet, config.gradient_checkpointing)
        self.model = self._data_parallel() if self.ranks.distributed else self.trainable
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, constant_with_warmup(config.lr_warmup_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.alphas_cumprod = training_alphas_cumprod()
        self.objective = LossSettings(config.dfc_form, config.dfc_weight, AUTOCAST_DTYPES[config.mixed_precision])
        self.global_step = 0
        if config.resume_from_checkpoint:
            self._resume(config.resume_from_checkpoint)
        elif self.ranks.is_main and list_checkpoints(self.output_dir):
            log.warning("%s already holds checkpoints; this new run overwrites those of the same step (set "
                        "resume_from_checkpoint: latest to continue instead)", self.output_dir)

    def _data_parallel(self) -> DistributedDataParallel:
        """DDP over the trainable modules only. The paper's DFC form leaves the other DFC heads without gradients,
        which DDP must be told of; their gradients stay None, as in one process."""
        devices = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.trainable, device_ids=devices,
                                       find_unused_parameters=self.config.dfc_form == "paper")

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW, or with ``shard_optimizer_state`` AdamW whose state each rank keeps for its share of the weights."""
        cfg = self.config
        options = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                       weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        if cfg.shard_optimizer_state:
            from torch.distributed.optim import ZeroRedundancyOptimizer  # its import scripts modules: only when used

            return ZeroRedundancyOptimizer(self.trainable.parameters(), optimizer_class=torch.optim.AdamW, **options)
        return torch.optim.AdamW(self.trainable.parameters(), **options)

    def _from_rank_0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank, so that all ranks act on one decision."""
        if not self.ranks.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _resume(self, where: str) -> None:
        if where == "latest":
            found = list_checkpoints(self.output_dir)
            chosen = self._from_rank_0(str(found[-1]) if found else None)
            if chosen is None:
                log.info("resume_from_checkpoint is 'latest' but %s has no checkpoint; starting a new run",
                         self.output_dir)
                return
            folder = Path(chosen)
        else:
            folder = Path(where)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such checkpoint on rank {self.ranks.rank}; to resume, every rank "
                                  "must see the checkpoint rank 0 wrote (put output_dir on a filesystem all nodes "
                                  "share)")
        ckpt = load_checkpoint(folder)
        if ckpt.controlnet_config != self.trainable.controlnet.config or ckpt.unet_config != self.base.unet.config:
            raise CheckpointError(f"{folder}: its model configs differ from the ones this run builds from "
                                  f"{self.config.pretrained_model}; resume with the same base model")
        self.trainable.controlnet.load_state_dict(ckpt.controlnet)
        self.trainable.conditional_attention.load_state_dict(ckpt.conditional_attention)
        step, state = read_training_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.global_step = step
        log.info("resumed from %s at step %d", folder, step)
        if state.get("world_size", 1) != self.ranks.world_size:
            log.warning("%s was written by a run of %d processes and this one has %d: the effective batch and the "
                        "sample order differ from those of the run it continues", folder,
                        state.get("world_size", 1), self.ranks.world_size)

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: per-rank batch x accumulation x world size."""
        return self.config.train_batch_size * self.config.gradient_accumulation_steps * self.ranks.world_size

    def training_state(self) -> dict[str, Any]:
        """What a resume needs besides the weights; with the sharded optimizer, only on rank 0 and only after
        every rank called ``consolidate_state_dict``."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "world_size": self.ranks.world_size,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def save(self) -> Path | None:
        """Write ``checkpoint-<step>`` and drop the oldest beyond ``checkpoints_total_limit``. Every rank calls it
        (the sharded optimizer state is gathered to rank 0 first); rank 0 writes and returns the folder, the others
        return None once it is written."""
        if self.config.shard_optimizer_state:
            self.optimizer.consolidate_state_dict(to=0)
        folder = None
        if self.ranks.is_main:
            folder = write_checkpoint(self.output_dir / f"checkpoint-{self.global_step}", self.trainable,
                                      self.base.unet, self.config.single_file_dtype, self.training_state(),
                                      self.global_step)
            if self.config.checkpoints_total_limit:
                prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
            log.info("saved %s", folder)
        if self.ranks.distributed:
            dist.barrier()
        return folder

    def _micro_step(self, batch: dict, sync: bool) -> LossTerms:
        """Forward and backward of one batch; in a distributed run only a ``sync`` micro-step all-reduces the
        gradients, the others accumulate locally under DDP's ``no_sync``."""
        generators = [noise_generator(self.config.seed, epoch, index) for index, epoch in batch["keys"]]
        with nullcontext() if sync or not self.ranks.distributed else self.model.no_sync():
            terms = batch_loss(self.model, self.base, batch, generators, self.alphas_cumprod, self.objective)
            self.scaler.scale(terms.loss / self.config.gradient_accumulation_steps).backward()
        return LossTerms(*(t.detach() for t in (terms.loss, terms.mse, terms.dfc)))

    def _step_means(self, terms: list[LossTerms]) -> list[float]:
        """The step's loss, mse and dfc: the means over its micro-batches and, in a distributed run, over the
        ranks, i.e. over the whole effective batch."""
        means = [_mean(t.loss for t in terms), _mean(t.mse for t in terms), _mean(t.dfc for t in terms)]
        if not self.ranks.distributed:
            return means
        total = torch.tensor(means, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return (total / self.ranks.world_size).tolist()

    def _update(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.config.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # fp16 overflow skips the update; the schedule waits too (as accelerate)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> list[dict[str, Any]]:
        """Train up to ``max_train_steps``; returns this run's log records (also appended to loss_log.jsonl)."""
        cfg = self.config
        main, world = self.ranks.is_main, self.ranks.world_size
        loss_log = None
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            run = asdict(cfg) | {"world_size": world, "effective_batch_size": self.effective_batch_size}
            (self.output_dir / "train_config.json").write_text(json.dumps(run, indent=2) + "\n")
            loss_log = LossLog(self.output_dir / LOSS_LOG, keep_until=self.global_step)
        log.info("effective batch %d = train_batch_size %d x gradient_accumulation_steps %d x %d process%s",
                 self.effective_batch_size, cfg.train_batch_size, cfg.gradient_accumulation_steps, world,
                 "es" if world > 1 else "")
        accumulation = cfg.gradient_accumulation_steps
        sampler = ResumableBatchSampler(len(self.dataset), cfg.train_batch_size, cfg.seed,
                                        start=self.global_step * accumulation, rank=self.ranks.rank, world_size=world)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=cfg.dataloader_num_workers)
        batches = iter(loader)
        records = []
        with tqdm(total=cfg.max_train_steps, initial=self.global_step, disable=not (cfg.progress_bar and main),
                  desc="XPSR training", unit="step") as bar:
            while self.global_step < cfg.max_train_steps:
                terms = [self._micro_step(next(batches), sync=i == accumulation - 1) for i in range(accumulation)]
                lr = self.scheduler.get_last_lr()[0]
                self._update()
                self.global_step += 1
                loss, mse, dfc = self._step_means(terms)
                record = {"step": self.global_step, "loss": loss, "mse": mse, "dfc": dfc, "lr": lr}
                if loss_log is not None:
                    loss_log.write(record)
                records.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                if self.global_step % cfg.checkpointing_steps == 0 or self.global_step == cfg.max_train_steps:
                    self.save()
        return records


def _mean(values: Iterable[torch.Tensor]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)
