"""torch.compile on the XPSR MODEL, as TorchCompileModel applies it: one graph for the UNet and its conditional
attention, no graph break, no recompile after the first run.

TorchCompileModel calls comfy_api's set_torch_compile_wrapper with inductor; the test calls the same function with
the aot_eager backend: Dynamo's tracing (graph breaks, guards, recompiles) is the same, without inductor's C++
code generation (about a minute on two CPU cores).
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import comfy_host  # noqa: F401  (skips this module without COMFYUI_PATH)

import comfy.ldm.modules.attention
from comfy_api.torch_helpers import set_torch_compile_wrapper

from parity import assert_parity
from test_host_native import case_inputs
from test_host_parity import evaluate_once, xpsr_model


@torch.no_grad()
def test_torch_compile_traces_the_unet_with_its_conditional_attention_in_one_graph_and_never_recompiles(monkeypatch):
    # What --use-pytorch-cross-attention selects. The CPU default (sub-quadratic) asks psutil for the free memory
    # inside every attention: a graph break for the stock UNet's attentions as much as for XPSR's.
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention",
                        comfy.ldm.modules.attention.attention_pytorch)
    model, control = xpsr_model()
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend="aot_eager")
    reference = evaluate_once(model, *case_inputs(model, control), cfg=4.5)
    torch._dynamo.reset()
    runs = []
    for _ in range(3):
        counters.clear()
        eps = evaluate_once(compiled, *case_inputs(compiled, control), cfg=4.5)
        runs.append({"graphs": counters["stats"]["unique_graphs"], "captured": counters["stats"]["calls_captured"],
                     "graph_breaks": sum(counters["graph_break"].values())})
        assert_parity(eps, reference, "compiled vs eager eps", tolerance=1e-5)
    assert runs[0]["graphs"] == 1 and runs[0]["graph_breaks"] == 0, runs
    assert runs[1] == runs[2] == {"graphs": 0, "captured": 0, "graph_breaks": 0}, runs
