"""A test pack for ComfyUI's server: one node that reports what the server's process holds, so that tests and the
soak benchmark read it over HTTP (the node's UI output, in the prompt's history) without a foothold in the process.

Queued as the previous prompt plus this node, everything else is cached and only the probe runs: it reads the
process between two prompts as the user's next prompt finds it, and ComfyUI's caches stay as they were.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from typing_extensions import override

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
from comfy_api.latest import ComfyExtension, io

XPSR_PARTS = ("SFAControlNet", "ConditionalAttention")
"""The pack's model classes: ComfyUI's loaded models and the live objects are counted by these names."""


def resident_bytes() -> int:
    """The process's resident memory (Linux's VmRSS)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def live_objects() -> tuple[int, dict[str, int]]:
    """The bytes of every storage a live tensor views (each storage once: weights, caches, outputs), and how many
    model patchers, diffusion models, XPSR parts and generating (captioning) models are alive."""
    generating = getattr(sys.modules.get("transformers"), "GenerationMixin", ())
    storages, counts = {}, dict.fromkeys(("model_patchers", "diffusion_models", "xpsr_parts", "caption_models"), 0)
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:
                storage = obj.untyped_storage()
            except (NotImplementedError, RuntimeError):  # tensors without storage (meta, sparse)
                continue
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, comfy.model_patcher.ModelPatcher):
            counts["model_patchers"] += 1
        elif isinstance(obj, comfy.model_base.BaseModel):
            counts["diffusion_models"] += 1
        elif type(obj).__name__ in XPSR_PARTS:
            counts["xpsr_parts"] += 1
        elif generating and isinstance(obj, generating):
            counts["caption_models"] += 1
    return sum(storages.values()), counts


class XPSRTestServerProbe(io.ComfyNode):
    """What the server holds: resident memory and live tensor bytes after a garbage collection (as ComfyUI's
    prompt worker runs one between prompts), ComfyUI's loaded models by class and their loaded bytes, and counts
    of live model objects."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="XPSRTestServerProbe", category="testing", inputs=[], outputs=[],
                         is_output_node=True, not_idempotent=True)

    @classmethod
    def fingerprint_inputs(cls):
        return time.time()

    @classmethod
    def execute(cls):
        gc.collect()
        loaded = [m for m in comfy.model_management.current_loaded_models if m.model is not None]
        tensor_bytes, live = live_objects()
        return io.NodeOutput(ui={
            "loaded": [type(m.model.model).__name__ for m in loaded],
            "loaded_bytes": [sum(m.model_loaded_memory() for m in loaded)],
            "resident_bytes": [resident_bytes()],
            "tensor_bytes": [tensor_bytes],
            "live": [live],
        })


class _Extension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [XPSRTestServerProbe]


async def comfy_entrypoint():
    return _Extension()
