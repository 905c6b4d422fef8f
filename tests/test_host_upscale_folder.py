"""The batch command upscales a dataset through the real nodes, with the official caption files, sharded under
torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

import comfy_host as H  # skips this module without COMFYUI_PATH

SCRIPT = H.REPO / "scripts" / "upscale_folder.py"
WORKER = H.REPO / "tests" / "host_upscale_worker.py"


def test_folder_is_upscaled_with_each_images_captions(tmp_path: Path, monkeypatch):
    captions = H.pack_module("xpsr_core.captioning.captions")
    lr = tmp_path / "set" / "LR"
    lr.mkdir(parents=True)
    for i, size in enumerate([(20, 16), (24, 24)]):
        H.pack_module("nodes.caption").to_pil(H.test_image(size[1], size[0], seed=i)[0]).save(lr / f"im{i}.png")
        paths = captions.caption_paths(lr / f"im{i}.png")
        captions.write_caption(paths.high_level, f"picture number {i}")
        captions.write_caption(paths.low_level, "blurry")
    batch = H.load_script("upscale_folder")
    seen = []
    encode = H.pack_module("nodes.prompt_encode").XPSRDualPromptEncode.execute.__func__

    def spy(cls, clip, high_level, **rest):
        seen.append(high_level[0])
        return encode(cls, clip, high_level, **rest)

    monkeypatch.setattr(H.pack_module("nodes.prompt_encode").XPSRDualPromptEncode, "execute", classmethod(spy))
    sampler = batch.SAMPLER_DEFAULTS | {"steps": 2, "process_size": 64, "scale": 2.0}

    def make_prompt(image: Path) -> dict:
        high, low = batch.captions_for(image, "txt", captions)
        return batch.build_prompt(image, {"class_type": "XPSRTestTinySD15", "inputs": {}}, H.XPSR_FILE, sampler,
                                  batch.prompt_settings(H.pack_module("xpsr_core.pipeline.prompts")), high, low)

    H.setup_host()
    report = batch.run_folder(sorted(lr.iterdir()), tmp_path / "out", make_prompt)
    assert [name for name, _ in report.done] == ["im0.png", "im1.png"] and not report.failed
    assert [Image.open(tmp_path / "out" / name).size for name, _ in report.done] == [(40, 32), (48, 48)]
    assert seen == ["picture number 0", "picture number 1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upscale_command(dataset: Path, output: Path, ranks: int) -> subprocess.CompletedProcess:
    """The command on the tiny SD1.5, under torchrun with ``ranks`` processes (0: plain, without torchrun)."""
    launcher = [] if ranks == 0 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                                      "127.0.0.1", "--master_port", str(free_port())]
    arguments = ["--input", str(dataset / "LR"), "--output", str(output), "--checkpoint", "tiny", "--xpsr",
                 H.XPSR_FILE, "--captions", "none", "--steps", "2", "--process-size", "64", "--scale", "2", "--cpu",
                 "--seed", "7"]
    return subprocess.run([sys.executable, *launcher, str(WORKER), *arguments], capture_output=True, text=True,
                          timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"}, cwd=H.REPO)


def pixels(folder: Path) -> dict[str, bytes]:
    return {p.name: Image.open(p).tobytes() for p in sorted(folder.iterdir())}


def test_two_ranks_write_the_images_one_rank_writes_and_a_rerun_skips_them(tmp_path: Path):
    """Seeds come from the run's seed and each image's name, so the shards do not change the results; an image
    that fails is reported by name and reason while the others are upscaled."""
    lr = tmp_path / "set" / "LR"
    lr.mkdir(parents=True)
    for i in range(3):
        H.pack_module("nodes.caption").to_pil(H.test_image(16, 16, seed=i)[0]).save(lr / f"im{i}.png")
    (lr / "broken.png").write_text("not a picture")

    alone = upscale_command(tmp_path / "set", tmp_path / "one", ranks=0)
    shared = upscale_command(tmp_path / "set", tmp_path / "two", ranks=2)
    for run in (alone, shared):
        assert run.returncode == 1, run.stderr[-3000:]
        assert "upscaled 3 images" in run.stdout and "0 skipped (already done), 1 failed" in run.stdout
        assert "failed: broken.png: LoadImage: cannot identify image file" in run.stdout
    assert "on 1 rank" in alone.stdout and "on 2 ranks" in shared.stdout
    for progress in ("[rank 1/2] [1/2] im0.png -> im0.png", "[rank 0/2] [2/2] im1.png -> im1.png",
                     "[rank 1/2] [2/2] im2.png -> im2.png"):
        assert progress in shared.stdout, shared.stdout
    assert pixels(tmp_path / "two") == pixels(tmp_path / "one") and len(pixels(tmp_path / "one")) == 3

    again = upscale_command(tmp_path / "set", tmp_path / "two", ranks=2)
    assert "upscaled 0 images on 2 ranks" in again.stdout and "3 skipped (already done), 1 failed" in again.stdout


def test_seeds_depend_on_the_run_seed_and_the_image_name_only():
    seed = H.pack_module("xpsr_core.sharding").image_seed
    assert seed(7, "a.png") == seed(7, "a.png") != seed(7, "b.png") != seed(8, "b.png")
    assert 0 <= seed(2**64 - 1, "a.png") <= 0xFFFFFFFFFFFFFFFF


def test_an_interrupted_write_leaves_no_result_a_resumed_run_would_skip(tmp_path: Path):
    batch = H.load_script("upscale_folder")
    (tmp_path / ".im0.png.partial").write_bytes(b"half a picture")
    assert not batch.output_path(tmp_path, Path("LR/im0.png")).exists()


def test_command_refuses_a_missing_folder(tmp_path: Path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "o"), "--checkpoint", "a", "--xpsr", "b"], capture_output=True, text=True,
                         env={"COMFYUI_PATH": H.COMFYUI_PATH, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "--input" in run.stderr and "is not a folder" in run.stderr


def test_command_defaults_are_the_sampler_nodes_defaults():
    H.setup_host()
    spec = H.nodes.NODE_CLASS_MAPPINGS["XPSRSampler"].INPUT_TYPES()["required"]
    defaults = H.load_script("upscale_folder").SAMPLER_DEFAULTS
    assert defaults == {name: spec[name][1]["default"] for name in defaults}


def test_command_prompt_settings_are_the_prompt_nodes_defaults():
    H.setup_host()
    spec = H.nodes.NODE_CLASS_MAPPINGS["XPSRDualPromptEncode"].INPUT_TYPES()["required"]
    settings = H.load_script("upscale_folder").prompt_settings(H.pack_module("xpsr_core.pipeline.prompts"))
    assert settings == {name: spec[name][1]["default"] for name in settings}
