"""Training under torchrun: 2 processes on gloo train as 1 process with twice the batch, resume exactly, write once.

Each torchrun launch starts two CPU processes on 127.0.0.1 and is killed after LAUNCH_TIMEOUT
seconds. The reference is one in-process Trainer with the 2-process run's global batch. The
crops are 128 px (latent 16, the fixture UNet's size): at 64 px its deepest level is 1x1, where
a GroupNorm group holds two values and turns the float32 rounding of different batch shapes
into loss differences of 1e-4 (float64 agrees to 1e-15 there). AdamW's epsilon is 1e-4: AdamW
divides each gradient element by its own size, so an element whose true gradient is zero (a
bias in front of a GroupNorm of one channel per group gets 1e-8 of rounding) moves by the
learning rate in a direction the rounding picks; eps 1e-4 holds those still.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tiny_sd15 import build_dataset, build_tiny_base
from xpsr_core import load_checkpoint
from xpsr_core.training import ConfigError, Trainer, train_config_from_dict
from xpsr_core.training.data import ResumableBatchSampler
from xpsr_core.training.distributed import torchrun_ranks
from xpsr_core.training.trainer import LOSS_LOG

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 120
STEPS = 4
_CONFIGS = itertools.count()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    build_tiny_base(root)
    build_dataset(root / "data", size=128)
    return root


def settings(root: Path, output: Path, **overrides) -> dict:
    values = dict(pretrained_model=str(root / "tiny-sd15"), train_data_dir=str(root / "data"), output_dir=str(output),
                  resolution=128, progress_bar=False, learning_rate=1e-3, lr_warmup_steps=2, max_train_steps=STEPS,
                  checkpointing_steps=2, original_image_ratio=0.5, adam_epsilon=1e-4, device="cpu")
    return values | overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, output: Path, processes: int = 2, **overrides) -> str:
    """``torchrun --nproc_per_node 2 -m xpsr_core.training --config <yaml>``; its output, or a failure with it."""
    config = root / f"config-{next(_CONFIGS)}.yaml"
    config.write_text(yaml.safe_dump(settings(root, output, **overrides)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "xpsr_core.training", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} | \
        {"OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as launch:
        try:
            output_text, _ = launch.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
            output_text, _ = launch.communicate()
            pytest.fail(f"torchrun ran past {LAUNCH_TIMEOUT} s:\n{output_text[-4000:]}")
    assert launch.returncode == 0, output_text[-4000:]
    return output_text


@pytest.fixture(scope="module")
def two_processes(root):
    """2-process runs of batch 1 per process, launched once per setting."""
    done: dict[tuple, tuple[Path, str]] = {}

    def run(accumulation: int, shard: bool) -> tuple[Path, str]:
        if (accumulation, shard) not in done:
            output = root / f"ddp-acc{accumulation}-{'zero' if shard else 'adamw'}"
            log = torchrun(root, output, train_batch_size=1, gradient_accumulation_steps=accumulation,
                           shard_optimizer_state=shard)
            done[accumulation, shard] = output, log
        return done[accumulation, shard]
    return run


@pytest.fixture(scope="module")
def one_process(root):
    """1-process runs of batch 2 (the 2-process runs' global batch), in this process, once per accumulation."""
    done: dict[int, tuple[list[dict], Trainer]] = {}

    def run(accumulation: int) -> tuple[list[dict], Trainer]:
        if accumulation not in done:
            trainer = Trainer(train_config_from_dict(settings(root, root / f"single-acc{accumulation}",
                                                              train_batch_size=2,
                                                              gradient_accumulation_steps=accumulation)))
            done[accumulation] = trainer.run(), trainer
        return done[accumulation]
    return run


def loss_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / LOSS_LOG).read_text().splitlines()]


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(folder)
    return {**{f"controlnet.{k}": v for k, v in ckpt.controlnet.items()},
            **{f"conditional_attention.{k}": v for k, v in ckpt.conditional_attention.items()}}


@pytest.mark.parametrize("accumulation, shard", [(1, False), (2, False), (1, True), (2, True)],
                         ids=["plain", "accumulation", "sharded", "accumulation-sharded"])
def test_two_processes_train_as_one_process_with_their_global_batch(two_processes, one_process, accumulation, shard):
    output, log = two_processes(accumulation, shard)
    reference, trainer = one_process(accumulation)
    records = loss_log(output)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, expected in zip(records, reference, strict=True):
        assert got["lr"] == expected["lr"]
        for key in ("loss", "mse", "dfc"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5), (got["step"], key)
    weights = trained_weights(output / f"checkpoint-{STEPS}")
    expected_weights = trainer.trainable.state_dict()
    assert weights.keys() == expected_weights.keys()
    for key, tensor in expected_weights.items():
        torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    run = json.loads((output / "train_config.json").read_text())
    assert (run["world_size"], run["effective_batch_size"]) == (2, 2 * accumulation)
    assert f"effective batch {2 * accumulation} = train_batch_size 1 x gradient_accumulation_steps {accumulation} " \
           "x 2 processes" in log


def test_two_process_run_resumes_exactly_and_rank_0_alone_writes(root, two_processes):
    whole, _ = two_processes(2, True)
    split = root / "ddp-split"
    torchrun(root, split, train_batch_size=1, gradient_accumulation_steps=2, shard_optimizer_state=True,
             max_train_steps=STEPS // 2)
    log = torchrun(root, split, train_batch_size=1, gradient_accumulation_steps=2, shard_optimizer_state=True,
                   resume_from_checkpoint="latest")
    assert log.count(f"resumed from {split / 'checkpoint-2'} at step 2") == 1  # rank 0 logs; both ranks resume
    assert (split / LOSS_LOG).read_text() == (whole / LOSS_LOG).read_text()  # each step once, bit-identical
    a, b = trained_weights(whole / f"checkpoint-{STEPS}"), trained_weights(split / f"checkpoint-{STEPS}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in split.iterdir()) == ["checkpoint-2", "checkpoint-4", LOSS_LOG, "train_config.json"]
    for step in (2, 4):
        assert sorted(p.name for p in (split / f"checkpoint-{step}").iterdir()) == \
            ["controlnet", "training_state", "unet", "xpsr.safetensors"]


def test_ranks_read_slices_of_the_batch_one_process_reads():
    one = iter(ResumableBatchSampler(8, 4, seed=3, start=5))
    ranks = [iter(ResumableBatchSampler(8, 2, seed=3, start=5, rank=r, world_size=2)) for r in range(2)]
    for _ in range(6):
        assert next(ranks[0]) + next(ranks[1]) == next(one)


def test_distributed_settings_that_cannot_work_are_refused(root, tmp_path):
    with pytest.raises(ConfigError, match=r"train_batch_size 3 x 2 processes = 6"):
        ResumableBatchSampler(4, 3, seed=0, world_size=2)
    with pytest.raises(ConfigError, match=r"sets RANK, WORLD_SIZE but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT; "
                                          r"start a distributed run with torchrun"):
        torchrun_ranks({"RANK": "0", "WORLD_SIZE": "2"})
    assert torchrun_ranks({}) is None
    with pytest.raises(ConfigError, match=r"'shard_optimizer_state' .* this run is one process; start it with "
                                          r"torchrun"):
        Trainer(train_config_from_dict(settings(root, tmp_path, shard_optimizer_state=True)))
