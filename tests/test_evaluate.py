"""Evaluation: Y-channel PSNR/SSIM agree with scikit-image; tables, CSV and skipped metrics are reported."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from xpsr_core.evaluation.evaluate import evaluate, image_pairs
from xpsr_core.evaluation.metrics import psnr_y, rgb_to_y, ssim_y

ROOT = Path(__file__).resolve().parents[1]


def photo_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A real photo and a degraded copy (blur by down/up-sampling plus noise), uint8 RGB."""
    clean = getattr(data, name)()[:192, :256]
    image = Image.fromarray(clean)
    blurred = np.asarray(image.resize((64, 48), Image.BICUBIC).resize(image.size, Image.BICUBIC), dtype=np.float64)
    noisy = blurred + np.random.default_rng(0).normal(0, 6, blurred.shape)
    return clean, np.clip(noisy, 0, 255).round().astype(np.uint8)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]


def skimage_y(a: np.ndarray) -> np.ndarray:
    return rgb_to_y(as_tensor(a))[0, 0].numpy()


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_and_ssim_on_y_agree_with_skimage(name: str, crop: int):
    clean, degraded = photo_pair(name)
    y_clean, y_degraded = skimage_y(clean), skimage_y(degraded)
    if crop:
        y_clean, y_degraded = y_clean[crop:-crop, crop:-crop], y_degraded[crop:-crop, crop:-crop]
    ref_psnr = peak_signal_noise_ratio(y_clean, y_degraded, data_range=255)
    ref_ssim = structural_similarity(y_clean, y_degraded, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert float(psnr_y(as_tensor(degraded), as_tensor(clean), crop)) == pytest.approx(ref_psnr, abs=1e-6)
    assert float(ssim_y(as_tensor(degraded), as_tensor(clean), crop)) == pytest.approx(ref_ssim, abs=1e-4)


def write_sets(tmp_path: Path) -> tuple[Path, Path]:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    for name in ("astronaut", "coffee"):
        clean, degraded = photo_pair(name)
        Image.fromarray(clean).save(gt / f"{name}.png")
        Image.fromarray(degraded).save(pred / f"{name}.png")
    return pred, gt


def test_command_writes_markdown_and_csv_and_names_skipped_metrics(tmp_path: Path):
    pred, gt = write_sets(tmp_path)
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "xpsr_core.evaluation.evaluate", "--pred", str(pred), "--gt", str(gt),
                          "--metrics", "psnr,ssim,lpips,niqe", "--out", str(out)], capture_output=True, text=True,
                         cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    table = (out / "results.md").read_text()
    assert table.startswith("| images | PSNR ↑ | SSIM ↑")
    assert "- LPIPS:" in table and "- NIQE:" in table
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[0][:3] == ["image", "psnr", "ssim"] and [r[0] for r in rows[1:]] == ["astronaut", "coffee", "mean"]
    assert float(rows[-1][1]) == pytest.approx((float(rows[1][1]) + float(rows[2][1])) / 2, abs=1e-5)


def test_unavailable_learned_metric_is_skipped_with_its_reason(tmp_path: Path, monkeypatch):
    pred, gt = write_sets(tmp_path)
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    report = evaluate(pred, gt, ["psnr", "dists", "fid"])
    assert report.skipped == {"dists": "pyiqa is not installed (pip install pyiqa)",
                              "fid": "pyiqa is not installed (pip install pyiqa)"}
    assert set(report.columns()) == {"psnr"}


def test_unmatched_or_misshapen_sets_are_refused(tmp_path: Path):
    pred, gt = write_sets(tmp_path)
    (pred / "coffee.png").unlink()
    with pytest.raises(ValueError, match="lacks predictions for 1 ground-truth images, e.g. 'coffee'"):
        image_pairs(pred, gt)
    Image.new("RGB", (10, 10)).save(pred / "coffee.png")
    with pytest.raises(ValueError, match=r"coffee.png is 10x10 px but coffee.png is 256x192 px"):
        evaluate(pred, gt, ["psnr"])
    with pytest.raises(ValueError, match="--pred .* is not a folder"):
        image_pairs(tmp_path / "none", gt)
