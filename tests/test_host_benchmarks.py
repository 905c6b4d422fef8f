"""benchmarks/run.py's whole-graph section, run as benchmarks/gpu.sh runs it but on the CPU at the smallest size.

gpu.sh only ever runs on a lent CUDA machine; this keeps its code path (in-memory models handed to the XPSR
Sampler and stock KSampler graphs through ComfyUI's executor, step timing, peak memory) working in between.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.ops


@pytest.mark.parametrize("dynamic_vram", [False, True], ids=["classic", "dynamic_vram_asked"])
def test_graph_benchmark_runs_the_xpsr_sampler_and_the_stock_controlnet_graph(tmp_path, dynamic_vram: bool):
    """Asked for on a CPU, dynamic VRAM stays off (as ComfyUI's main.py leaves it under --cpu) and says so."""
    steps = 2
    run = subprocess.run(
        [sys.executable, str(H.REPO / "benchmarks" / "run.py"), "--sections", "graph", "--channels", "32",
         "--graph-outputs", "64", "--graph-steps", str(steps), "--out", str(tmp_path),
         *(["--dynamic-vram"] if dynamic_vram else [])],
        capture_output=True, text=True, cwd=H.REPO, env=os.environ | {"COMFYUI_PATH": H.COMFYUI_PATH}, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    [row] = results["graph"]
    assert row["output_px"] == 64
    for graph in ("stock", "xpsr"):
        measured = row[graph]
        assert measured["steps"] == steps  # every step of each graph went through the timed MODEL
        assert measured["step_s"] > 0 and measured["peak_bytes"] >= measured["sampling_peak_bytes"] > 0
    assert row["step_ratio"] > 0 and row["peak_ratio"] > 0
    assert results["dynamic_vram"] is False
    assert "Whole graphs" in (tmp_path / "results.md").read_text() and "dynamic VRAM off" in (
        tmp_path / "results.md").read_text()


@H.deferred_layer_weights
def test_benchmark_models_have_every_weight_and_step_where_dynamic_vram_builds_layers_without_them(monkeypatch):
    """Under dynamic VRAM ComfyUI's Linear and Embedding layers are built with no weight; the benchmarks fill random
    weights in place, so they must build theirs allocated (on an H200, gpu.sh's dynamic VRAM run crashed at the
    first ControlNet layer before they did)."""
    monkeypatch.syspath_prepend(str(H.REPO / "benchmarks"))
    run = importlib.import_module("run")
    monkeypatch.setattr(importlib.import_module("comfy.memory_management"), "aimdo_enabled", True)
    assert comfy.ops.disable_weight_init.Linear(2, 2).weight is None  # what dynamic VRAM does to a layer
    pack = sys.modules[H.pack_module("nodes").__name__.rpartition(".")[0]]
    model, stock, patched, xpsr = run.build(pack, channels=32)
    clip, _ = run.clip_and_vae(torch.float32)
    modules = {"unet": model.model, "stock controlnet": stock.control_model, "xpsr controlnet": xpsr.control_model,
               "conditional attention": patched.get_additional_models()[0].model, "clip": clip.cond_stage_model}
    for name, module in modules.items():
        assert [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
                and m.weight is None] == [], name
    assert run.one_step(patched, xpsr, 8, True) > 0


def test_caption_tiles_benchmark_captions_the_sampler_grids_tiles(tmp_path):
    """benchmarks/run.py --sections caption_tiles: whole image against XPSR Tile Grid's tiles, per megapixel."""
    run = subprocess.run(
        [sys.executable, str(H.REPO / "benchmarks" / "run.py"), "--sections", "caption_tiles", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=H.REPO, env=os.environ | {"COMFYUI_PATH": H.COMFYUI_PATH}, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())["caption_tiles"]
    grid = H.pack_module("xpsr_core.pipeline.tiling").processing_tile_grid
    assert results["model"] == "tiny LLaVA"
    assert [(r["output_px"], r["tiles"]) for r in results["rows"]] == [
        (side * 4, grid(side, side, 4.0, 512, 64, 8).count) for side in (128, 256, 512)] == [
        (512, 1), (1024, 9), (2048, 25)]
    assert all(r["whole_s_per_mp"] > 0 and r["tiles_over_whole"] > 0 for r in results["rows"])
    assert "Captions per latent tile" in (tmp_path / "results.md").read_text()
