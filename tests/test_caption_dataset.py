"""The dataset captioning command writes the official layout, the same captions whether torchrun splits it or not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="MLLM captioning needs transformers")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import tiny_vlm  # noqa: E402
from xpsr_core.captioning import captions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vlm.build_llava(tmp_path_factory.mktemp("llm") / "llava-tiny")


def make_dataset(root: Path, count: int = 5) -> Path:
    (root / "LR").mkdir(parents=True)
    for i in range(count):
        pixels = (np.random.default_rng(i).random((20 + 4 * i, 24, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "LR" / f"im{i}.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caption_command(dataset: Path, model: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    """python -m xpsr_core.captioning.caption_dataset, under torchrun with ``ranks`` processes (0: plain, without
    torchrun)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())] if ranks else []
    command = [sys.executable, *launcher, "-m", "xpsr_core.captioning.caption_dataset", "--dataset", str(dataset),
               "--model", str(model), "--cpu", "--max-new-tokens", "4", "--batch-size", "2", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=REPO,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def written(dataset: Path) -> dict[str, str]:
    return {f"{p.parent.name}/{p.name}": captions.read_caption(p) for p in sorted(dataset.rglob("*.txt"))}


def test_two_ranks_write_the_captions_one_rank_writes(tmp_path: Path, model: Path) -> None:
    alone, shared = make_dataset(tmp_path / "one"), make_dataset(tmp_path / "two")
    one = caption_command(alone, model, ranks=0)
    two = caption_command(shared, model, ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "captioned 5 images on 1 rank" in one.stdout and "captioned 5 images on 2 ranks" in two.stdout
    assert "[rank 0/2] [3/3] im4.png: captions written" in two.stdout
    assert "[rank 1/2] [2/2] im3.png: captions written" in two.stdout
    assert written(shared) == written(alone) and len(written(alone)) == 10 and all(written(alone).values())

    again = caption_command(shared, model, ranks=2)
    assert "captioned 0 images on 2 ranks" in again.stdout and "5 skipped (already done), 0 failed" in again.stdout


def test_the_official_low_level_decoding_is_asked_for_by_name(tmp_path: Path, model: Path) -> None:
    dataset = make_dataset(tmp_path / "set", count=1)
    run = caption_command(dataset, model, 0, "--low-level-num-beams", "2", "--low-level-repetition-penalty", "1.5",
                          "--low-level-max-new-tokens", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(written(dataset)) == {"highlevel_prompt/im0.txt", "lowlevel_prompt_q/im0.txt"}


def test_a_folder_without_lr_is_refused_by_name(tmp_path: Path, model: Path) -> None:
    run = caption_command(tmp_path, model, ranks=0)
    assert run.returncode == 2 and f"--dataset {tmp_path} has no LR folder" in run.stderr
