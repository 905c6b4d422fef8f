"""The layers the core models are built from: an ``operations`` namespace, as in ComfyUI's ``comfy.ops``.

A host passes its own (ComfyUI passes ``comfy.ops``, which casts and offloads weights on
the fly); everything else (training, evaluation, the converter's checks) gets
``default_operations``: torch.nn's layers, except a Linear that runs fp32 CPU inputs
through oneDNN.

Why that Linear: PyTorch sends an fp32 matrix product on the CPU to MKL's GEMM, and a
convolution to oneDNN. On an AMD EPYC with AVX-512 (this project's machines) MKL's GEMM
ran 135-200 GFLOP/s on the shapes of an SD1.5 transformer block, the same product as a
1x1 convolution over a channels-last image 210-430 GFLOP/s (benchmarks/core_speed.py
measures what that does to a whole step). The projections and feed-forwards of XPSR's
three extra attentions per layer are such products, so on a CPU they are most of what
XPSR adds to a ControlNet step. The result is the same product, rounded differently
(within fp32 accumulation error). On CUDA and in other dtypes PyTorch's own path is used.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Operations = Any
"""A namespace with ``Linear``, ``Conv2d``, ``GroupNorm`` and ``LayerNorm`` (``default_operations`` or comfy.ops.*)."""


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a 1x1 convolution, which the CPU runs through oneDNN.

    x: (..., in) -> (..., out). The rows of ``x`` become the pixels of a (1, in, rows, 1)
    image whose memory is channels-last, which is the rows' own memory once they are
    contiguous, and the convolution's channels-last output is the contiguous (rows, out)
    result. (Rows taken from a transposed feature map would otherwise make an NCHW image,
    and a strided result that sends the attention after it to its unfused kernel.)
    """
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    image = rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.view(*weight.shape, 1, 1), bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def takes_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``Linear`` runs ``x`` through oneDNN: non-empty fp32 on the CPU, with oneDNN built and not switched
    off (``torch.backends.mkldnn.flags(enabled=False)`` gives PyTorch's own path back)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() > 0 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) that takes ``onednn_linear`` where ``takes_onednn``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
        return super().forward(x)


default_operations = SimpleNamespace(Linear=Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm, LayerNorm=nn.LayerNorm)
"""The core's layers when no host passes its own."""
