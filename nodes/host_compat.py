"""What differs between the ComfyUI versions the pack supports (0.3.64, October 2025, to 0.33.0, August 2026).

Each difference is decided by a feature check on the running ComfyUI (an attribute, a
signature), never by its version string, and names the release (or PR) that brought it.
The rest of the pack calls these functions instead of checking for itself. One exception:
benchmarks/run.py starts dynamic VRAM itself, as ComfyUI's main.py does, before ComfyUI's
model management is imported, which importing this module already does.

Internals the pack still relies on, for want of a public entry point in ``comfy_api``:
``execution.PromptExecutor`` (the batch command, the benchmarks and the tests run graphs
headless, as ``main.py`` does), ``comfy.model_patcher`` (XPSR's parts are models ComfyUI
loads, offloads and clones like its own), ``comfy.controlnet.ControlNet`` (the XPSR
ControlNet is one, so ComfyUI's samplers batch and schedule it), ``comfy.ops`` (the layers
ComfyUI casts, offloads and streams) and ``comfy.ldm.modules.attention`` (attention
selection and overrides).
"""

from __future__ import annotations

import asyncio
import inspect

import torch

import comfy.controlnet
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import execution


def prompt_executor(server) -> execution.PromptExecutor:
    """ComfyUI's executor with the classic cache (outputs kept while their inputs stay), as ``--cache-classic``.

    Since PR #10454 (RAM-pressure caching, after 0.3.64) it takes ``cache_args`` instead of
    ``cache_size``, and later releases read ``cache_args["ram"]`` on every prompt: the values
    are the ones ``main.py`` passes for the classic cache.
    """
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC)


def node_outputs(executor: execution.PromptExecutor, node_id: str) -> list | None:
    """What a node of the executor's last prompt gave, one list per output (None if it did not run).

    The output cache's ``get`` was a plain method returning those lists on 0.3.64; by 0.33.0 it
    is a coroutine returning a ``CacheEntry(ui, outputs)``.
    """
    cache = executor.caches.outputs
    if not inspect.iscoroutinefunction(cache.get):
        return cache.get(node_id)
    entry = asyncio.run(cache.get(node_id))
    return None if entry is None else entry.outputs


def core_model_patcher() -> type[comfy.model_patcher.ModelPatcher]:
    """The patcher class ComfyUI holds its own models in (the UNet, the core ControlNet).

    Since 0.16.0 (PR #12658, dynamic VRAM) that is ``CoreModelPatcher``, which ``main.py``
    rebinds to the streaming ``ModelPatcherDynamic`` where dynamic VRAM is on; looked up at
    each call for that reason. Before, every model was a ``ModelPatcher``.
    """
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def multigpu_clone_callbacks() -> list[str]:
    """The callbacks ComfyUI calls with (MODEL, its clone for another GPU) when it makes one.

    Since 0.24.0 (PR #7063, multi-GPU) ``deepclone_multigpu`` and ``match_multigpu_clones``
    make those clones; before there were none, and nothing to follow.
    """
    return [getattr(comfy.patcher_extension.CallbacksMP, name)
            for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES")
            if hasattr(comfy.patcher_extension.CallbacksMP, name)]


def device_clones(control: comfy.controlnet.ControlBase) -> dict[torch.device, comfy.controlnet.ControlBase]:
    """A control's clones for other GPUs, by device (0.24.0, PR #7063: ``multigpu_clones``); none before."""
    return getattr(control, "multigpu_clones", {})


def host_generates_text() -> bool:
    """Whether this ComfyUI lets a CLIP write text: ``CLIP.generate`` and ``CLIP.decode``, behind its Generate Text
    node (TextGenerate, comfy_extras/nodes_textgen.py).

    They came after 0.3.64 (the exact release is not known here); 0.33.0 generates with Qwen2.5-VL, Qwen3-VL,
    Qwen3.5, Gemma 3 and Gemma 4. 0.3.64 has neither method.
    """
    return callable(getattr(comfy.sd.CLIP, "generate", None)) and callable(getattr(comfy.sd.CLIP, "decode", None))


def clip_generates_text(clip: comfy.sd.CLIP) -> bool:
    """Whether ``clip`` can answer an instruction about an image through ``CLIP.generate``.

    Where the host has the route every CLIP has the method, but only a text model with a generation loop
    (``generate``, ComfyUI's ``BaseGenerate``) that also turns image tokens into embeddings (``preprocess_embed``)
    can do it; CLIP-L, T5 and text-only LLMs lack one or the other. Wrappers differ by model (Qwen3-VL sits in
    ``cond_stage_model.qwen3vl_8b``, LTX-2's Gemma in ``gemma3_12b``), so every submodule is looked at.
    """
    model = getattr(clip, "cond_stage_model", None)
    return host_generates_text() and isinstance(model, torch.nn.Module) and any(
        callable(getattr(m, "generate", None)) and callable(getattr(m, "preprocess_embed", None))
        for m in model.modules())
