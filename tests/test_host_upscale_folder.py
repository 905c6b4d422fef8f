"""The batch command upscales a dataset through the real nodes, with the official caption files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from PIL import Image

import comfy_host as H  # skips this module without COMFYUI_PATH

SCRIPT = H.REPO / "scripts" / "upscale_folder.py"


def script():
    spec = importlib.util.spec_from_file_location("upscale_folder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folder_is_upscaled_with_each_images_captions(tmp_path: Path, monkeypatch):
    captions = H.pack_module("xpsr_core.captions")
    lr = tmp_path / "set" / "LR"
    lr.mkdir(parents=True)
    for i, size in enumerate([(20, 16), (24, 24)]):
        H.pack_module("nodes.caption").to_pil(H.test_image(size[1], size[0], seed=i)[0]).save(lr / f"im{i}.png")
        paths = captions.caption_paths(lr / f"im{i}.png")
        captions.write_caption(paths.high_level, f"picture number {i}")
        captions.write_caption(paths.low_level, "blurry")
    batch = script()
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
                                  batch.prompt_settings(H.pack_module("xpsr_core.prompts")), high, low)

    H.setup_host()
    written = batch.run_folder(sorted(lr.iterdir()), tmp_path / "out", make_prompt)
    assert [p.name for p in written] == ["im0.png", "im1.png"]
    assert [Image.open(p).size for p in written] == [(40, 32), (48, 48)]
    assert seen == ["picture number 0", "picture number 1"]


def test_command_refuses_a_missing_folder(tmp_path: Path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "nope"), "--output",
                          str(tmp_path / "o"), "--checkpoint", "a", "--xpsr", "b"], capture_output=True, text=True,
                         env={"COMFYUI_PATH": H.COMFYUI_PATH, "PATH": "/usr/bin:/bin"})
    assert run.returncode == 2 and "--input" in run.stderr and "is not a folder" in run.stderr


def test_command_defaults_are_the_sampler_nodes_defaults():
    H.setup_host()
    spec = H.nodes.NODE_CLASS_MAPPINGS["XPSRSampler"].INPUT_TYPES()["required"]
    assert script().SAMPLER_DEFAULTS == {name: spec[name][1]["default"] for name in script().SAMPLER_DEFAULTS}


def test_command_prompt_settings_are_the_prompt_nodes_defaults():
    H.setup_host()
    spec = H.nodes.NODE_CLASS_MAPPINGS["XPSRDualPromptEncode"].INPUT_TYPES()["required"]
    settings = script().prompt_settings(H.pack_module("xpsr_core.prompts"))
    assert settings == {name: spec[name][1]["default"] for name in settings}
