"""The training loop: official initialisation, AdamW with warm-up, accumulation, mixed precision, checkpoints, resume.

One *step* is one optimizer update (``gradient_accumulation_steps`` batches), as in the
official accelerate loop; checkpoints, the warm-up and ``max_train_steps`` count steps. A
resumed run continues the same run: the trainable weights, optimizer, schedule, loss scaler
and random generator are restored, and the batch order depends only on the seed and the
batch number, so the losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..attention import set_gradient_checkpointing
from ..checkpoint import load_checkpoint
from ..errors import CheckpointError
from ..from_unet import controlnet_from_unet, new_conditional_attention
from ..sd15 import SD15Base, load_sd15
from .checkpoints import list_checkpoints, prune_checkpoints, read_training_state, write_checkpoint
from .config import ConfigError, TrainConfig
from .data import PairedDataset, ResumableBatchSampler, collate
from .objective import LossTerms, Objective, XPSRTrainable, batch_loss, training_alphas_cumprod

log = logging.getLogger(__name__)

LOSS_LOG = "loss_log.jsonl"
AUTOCAST_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """The ``device`` key as a torch device; asking for CUDA without one is a config error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'device' is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


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
    """XPSR training on a frozen SD1.5 base; ``base`` may be passed in when already loaded."""

    def __init__(self, config: TrainConfig, base: SD15Base | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.output_dir = Path(config.output_dir)
        self.dataset = PairedDataset(config.train_data_dir, config.resolution, config.highlevel_prompt,
                                     config.original_image_ratio, config.seed)
        if base is None:
            base = load_sd15(config.pretrained_model, configs=config.base_configs, tokenizer=config.tokenizer)
        self.base = base.requires_grad_(False).eval().to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            controlnet = controlnet_from_unet(self.base.unet)
            conditional = new_conditional_attention(self.base.unet.config)
        self.trainable = XPSRTrainable(controlnet, conditional).to(self.device).train()
        set_gradient_checkpointing(self.trainable, config.gradient_checkpointing)
        set_gradient_checkpointing(self.base.unet, config.gradient_checkpointing)
        self.optimizer = torch.optim.AdamW(self.trainable.parameters(), lr=config.learning_rate,
                                           betas=(config.adam_beta1, config.adam_beta2),
                                           weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, constant_with_warmup(config.lr_warmup_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.alphas_cumprod = training_alphas_cumprod()
        self.objective = Objective(config.dfc_form, config.dfc_weight, AUTOCAST_DTYPES[config.mixed_precision])
        self.global_step = 0
        if config.resume_from_checkpoint:
            self._resume(config.resume_from_checkpoint)
        elif list_checkpoints(self.output_dir):
            log.warning("%s already holds checkpoints; this new run overwrites those of the same step (set "
                        "resume_from_checkpoint: latest to continue instead)", self.output_dir)

    def _resume(self, where: str) -> None:
        if where == "latest":
            found = list_checkpoints(self.output_dir)
            if not found:
                log.info("resume_from_checkpoint is 'latest' but %s has no checkpoint; starting a new run",
                         self.output_dir)
                return
            folder = found[-1]
        else:
            folder = Path(where)
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
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.global_step = step
        log.info("resumed from %s at step %d", folder, step)

    def training_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def save(self) -> Path:
        """Write ``checkpoint-<step>`` and drop the oldest beyond ``checkpoints_total_limit``."""
        folder = write_checkpoint(self.output_dir / f"checkpoint-{self.global_step}", self.trainable, self.base.unet,
                                  self.config.single_file_dtype, self.training_state(), self.global_step)
        if self.config.checkpoints_total_limit:
            prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        log.info("saved %s", folder)
        return folder

    def _micro_step(self, batch: dict) -> LossTerms:
        terms = batch_loss(self.trainable, self.base, batch, self.generator, self.alphas_cumprod, self.objective)
        self.scaler.scale(terms.loss / self.config.gradient_accumulation_steps).backward()
        return LossTerms(*(t.detach() for t in (terms.loss, terms.mse, terms.dfc)))

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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        loss_log = LossLog(self.output_dir / LOSS_LOG, keep_until=self.global_step)
        accumulation = cfg.gradient_accumulation_steps
        sampler = ResumableBatchSampler(len(self.dataset), cfg.train_batch_size, cfg.seed,
                                        start=self.global_step * accumulation)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate,
                            num_workers=cfg.dataloader_num_workers)
        batches = iter(loader)
        records = []
        with tqdm(total=cfg.max_train_steps, initial=self.global_step, disable=not cfg.progress_bar,
                  desc="XPSR training", unit="step") as bar:
            while self.global_step < cfg.max_train_steps:
                terms = [self._micro_step(next(batches)) for _ in range(accumulation)]
                lr = self.scheduler.get_last_lr()[0]
                self._update()
                self.global_step += 1
                record = {"step": self.global_step, "loss": _mean(t.loss for t in terms),
                          "mse": _mean(t.mse for t in terms), "dfc": _mean(t.dfc for t in terms), "lr": lr}
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
