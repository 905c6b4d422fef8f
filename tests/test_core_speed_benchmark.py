"""benchmarks/core_speed.py runs end to end on a small copy of the SD1.5 architecture.

Its numbers are only meaningful at SD1.5 size; this run checks that the command works and
that the comparison is a fair one: the script itself fails unless the core UNet, without the
conditional attention, reproduces diffusers' stock UNet on the same inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("core_layers", ["default", "torch"])
def test_core_speed_benchmark_compares_the_core_with_diffusers(tmp_path: Path, core_layers: str):
    pytest.importorskip("diffusers")
    run = subprocess.run([sys.executable, "benchmarks/core_speed.py", "--sizes", "8", "--repeats", "1",
                          "--channels", "32", "--threads", "1", "--core-layers", core_layers, "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["core_layers"] == core_layers
    (row,) = results["sizes"]
    assert row["latent"] == 8
    for part in ("step", "controlnet"):
        # XPSR computes more than the stock ControlNet step: SFA's three attentions, the conditional attention.
        assert row[part]["flop_ratio"] > 1
        assert row[part]["time_ratio"] > 0
        assert row[part]["over_flop_ratio"] == pytest.approx(row[part]["time_ratio"] / row[part]["flop_ratio"])
    assert "| 8x8 | step |" in (tmp_path / "results.md").read_text()
