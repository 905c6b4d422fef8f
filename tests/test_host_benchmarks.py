"""benchmarks/run.py's whole-graph section, run as benchmarks/gpu.sh runs it but on the CPU at the smallest size.

gpu.sh only ever runs on a lent CUDA machine; this keeps its code path (in-memory models handed to the XPSR
Sampler and stock KSampler graphs through ComfyUI's executor, step timing, peak memory) working in between.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import comfy_host as H  # skips this module without COMFYUI_PATH


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
