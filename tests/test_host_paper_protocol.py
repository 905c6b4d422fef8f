"""The paper's protocol end to end on a tiny RealSR: upscaled through the real nodes, scored, beside Table 1."""

from __future__ import annotations

from pathlib import Path

import pytest

import comfy_host as H  # skips this module without COMFYUI_PATH

from host_upscale_worker import TINY_BASE
from xpsr_core import sharding
from xpsr_core.evaluation import evaluate


def tiny_set(root: Path, count: int = 2) -> Path:
    """<root>/LR (16 px) and <root>/HR (32 px) in the official test layout."""
    to_pil = H.pack_module("nodes.caption").to_pil
    for part, size in (("LR", 16), ("HR", 32)):
        (root / part).mkdir(parents=True)
        for i in range(count):
            to_pil(H.test_image(size, size, seed=i)[0]).save(root / part / f"{i:04d}.png")
    return root


def test_a_tiny_realsr_is_upscaled_scored_and_set_beside_the_papers_numbers(tmp_path: Path):
    dataset = tiny_set(tmp_path / "RealSR")
    script = H.load_script("paper_protocol")
    args, upscale_argv = script.parse_args([
        "--sets", str(dataset), "--output", str(tmp_path / "results"), "--metrics", "psnr,ssim,lpips",
        "--checkpoint", "tiny", "--xpsr", H.XPSR_FILE, "--captions", "none", "--steps", "2", "--process-size", "64",
        "--scale", "2", "--cpu"])
    H.setup_host()
    status = script.run(args, upscale_argv, script.upscale_folder(), H.pack_module("xpsr_core"), TINY_BASE,
                        sharding.Ranks())
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "results" / "RealSR").iterdir()) == ["0000.png", "0001.png"]
    reference = evaluate.evaluate(tmp_path / "results" / "RealSR", dataset / "HR", ["psnr", "ssim"]).means()
    table = (tmp_path / "results" / "RealSR.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "## RealSR"
    assert lines[2] == "| | images | PSNR ↑ | SSIM ↑ | LPIPS ↓ | DISTS ↓ | FID ↓ | MANIQA ↑ | CLIPIQA ↑ | MUSIQ ↑ |"
    assert lines[4] == (f"| this run | 2 | {reference['psnr']:.2f} | {reference['ssim']:.4f} | n/a | n/a | n/a | n/a "
                        "| n/a | n/a |")
    assert lines[5] == ("| XPSR, paper Table 1 (RealSR) | | n/a | 0.6870 | 0.3517 | 0.2471 | 141.95 | 0.6059 | "
                        "0.7354 | 70.23 |")
    assert "- LPIPS not scored: " in table and "- FID not scored: not asked for" in table
    assert "- paper's PSNR for RealSR: not legible in the paper's text" in table
    assert (tmp_path / "results" / "RealSR.csv").is_file()


def test_a_set_without_hr_is_refused_by_name(tmp_path: Path, capsys):
    (tmp_path / "DRealSR" / "LR").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        H.load_script("paper_protocol").parse_args(["--sets", str(tmp_path / "DRealSR"), "--output",
                                                    str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert f"--sets {tmp_path / 'DRealSR'} has no HR folder" in capsys.readouterr().err
