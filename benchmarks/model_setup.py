"""What the benchmarks share: the same random weights for every model, and FLOPs counted with the CPU attention.

Imported by the benchmark scripts (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel."""
    return sdpa_flop_count(query, key, value)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The same random weights for every model: ComfyUI's ops leave them uninitialised, and values that differ
    between the models (or denormals) would bias the timing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if "norm" in name else 0.0)
    return module


@contextlib.contextmanager
def allocated_weights() -> Iterator[None]:
    """Models built here get their weights allocated, as ComfyUI builds them without dynamic VRAM.

    Under dynamic VRAM (ComfyUI 0.16 and later) ComfyUI's Linear and Embedding layers are
    built with no weight, which only loading a state dict gives them; ``randomize`` fills
    parameters in place, so the benchmarks' models are built as without it. That is the
    state such a load leaves a model in (every weight a CPU tensor): the patchers, loading
    and sampling still run under dynamic VRAM.
    """
    memory_management = sys.modules.get("comfy.memory_management")
    deferring = getattr(memory_management, "aimdo_enabled", False)
    if deferring:
        memory_management.aimdo_enabled = False
    try:
        yield
    finally:
        if deferring:
            memory_management.aimdo_enabled = True
