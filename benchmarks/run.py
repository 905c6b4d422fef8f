"""Benchmarks of XPSR in ComfyUI against the stock SD1.5 + ControlNet it extends.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/run.py [--sizes 32,64] [--repeats 3] [--out benchmarks/results]

Every figure is a ratio measured within one run (these machines are noisy): the time of one
sampling step (CFG batch 2) of XPSR (patched MODEL + SFA-ControlNet) over the stock model
with a stock ControlNet, beside the ratio of their FLOPs; the conditional attention's peak
memory per token at growing token counts (linear memory gives a flat ratio); the peak memory
of a whole step per output pixel; the time of a tiled step per megapixel from 512 to 2048 px
(per output and per processed tile pixel: the official grid overlaps); with TorchCompileModel,
the first (compiling) and the steady step of XPSR over the stock model, with Dynamo's graph,
graph-break and recompile counts; a tiled step with one tile per model call over as many as
memory allows; the XPSR weights' bytes in fp8 over fp16; the captioning time per image
with the MLLM's load/unload overhead; captioning per latent tile against the whole image,
per megapixel; and whole graphs through ComfyUI's executor, the XPSR Sampler graph beside
a stock SD1.5 + ControlNet KSampler graph, with their peak memory and time per step (per
VRAM launch flag, and with or without dynamic VRAM, one process each).
SD1.5 sizes, random weights built in memory, the XPSR parts from ComfyUI's ops as XPSR Loader
builds them. Results go to results.json and results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cli
import report
import torch
from model_setup import allocated_weights, randomize
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def import_comfy(pytorch_attention: bool, vram: str | None = None, dynamic_vram: bool = False):
    """ComfyUI with the pack loaded; ``vram`` is a launch flag's name (lowvram, novram), set before its import;
    ``dynamic_vram`` starts ComfyUI's dynamic VRAM as its main.py does, where the host has it (see below)."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = pytorch_attention
    if vram:
        setattr(args, vram, True)
    dynamic_vram = dynamic_vram and start_dynamic_vram_allocator(args)
    import nodes

    if dynamic_vram:
        enable_dynamic_vram(args)
    asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    return sys.modules[str(REPO).replace(".", "_x_")]


def start_dynamic_vram_allocator(args) -> bool:
    """comfy-aimdo's allocator, which ComfyUI's main.py (0.16 and later, where dynamic VRAM is on by default on
    NVIDIA) starts before its model management is imported; this process has no main.py, so it does the same.
    False, and nothing started, where the host has no dynamic VRAM or its flags leave it off (--cpu, --novram...)."""
    import comfy.cli_args

    enables = getattr(comfy.cli_args, "enables_dynamic_vram", None)
    if enables is None or not enables():
        return False
    import comfy_aimdo.control

    headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
    try:
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
    except TypeError:  # older comfy-aimdo protocols, as main.py falls back
        comfy_aimdo.control.init()
    return True


def enable_dynamic_vram(args) -> None:
    """main.py's second step: the devices, then ComfyUI's models held by the streaming patcher. Where comfy-aimdo
    declines, ComfyUI stays on its classic patcher; the results say which ran (``dynamic_vram``)."""
    import comfy_aimdo.control

    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not mm.is_nvidia():  # main.py's dynamic_vram_supported(), less ROCm 7.14 and later
        return
    try:
        started = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3))
                                                   for d in mm.get_all_torch_devices())
    except TypeError:
        started = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
    if started:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True


def dynamic_vram_on() -> bool:
    memory_management = sys.modules.get("comfy.memory_management")
    return bool(getattr(memory_management, "aimdo_enabled", False))


def passthrough_override(attention, *args, **kwargs):
    """An optimized_attention_override that calls the selected attention, as sage/flash patch nodes install theirs."""
    return attention(*args, **kwargs)


def unet_configs(pack, channels: int = 320) -> tuple[dict, dict]:
    """ComfyUI's SD1.5 UNet config and the pack's diffusers-layout one, with ``channels`` in the first level (320 is
    SD1.5; fewer make the same architecture small enough for a smoke run on a CPU)."""
    sd15 = importlib.import_module(f"{pack.__name__}.xpsr_core.models.sd15_configs").UNET
    levels = [channels * m for m in SD15_UNET["channel_mult"]]
    return SD15_UNET | {"model_channels": channels}, sd15 | {"block_out_channels": levels}


def build(pack, dtype: torch.dtype = torch.float32, override: bool = False, channels: int = 320):
    """SD1.5 with a stock ControlNet, and with XPSR, all in ``dtype`` (``channels``: see unet_configs);
    ``override`` installs a passthrough attention override on both MODELs."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    core = importlib.import_module(f"{pack.__name__}.xpsr_core")
    ConditionalAttention, ControlNetConfig = core.ConditionalAttention, core.ControlNetConfig
    SFAControlNet, UNetConfig = core.SFAControlNet, core.UNetConfig
    unet, sd15 = unet_configs(pack, channels)

    with allocated_weights():
        device, offload = mm.get_torch_device(), mm.unet_offload_device()
        patcher = pack.nodes.host_compat.core_model_patcher()  # as ComfyUI's loaders and XPSR Loader hold their models
        config = comfy.supported_models.SD15(dict(unet))
        config.set_inference_dtype(dtype, None)
        base = config.get_model({}, device=offload)
        randomize(base.diffusion_model)
        model = patcher(base, load_device=device, offload_device=offload)
        if override:
            model.model_options["transformer_options"]["optimized_attention_override"] = passthrough_override

        stock_cn = randomize(comfy.cldm.cldm.ControlNet(hint_channels=3, dtype=dtype, **{
            k: v for k, v in unet.items() if k != "transformer_depth_output"}), 1)
        stock = comfy.controlnet.ControlNet(stock_cn, load_device=device)

        settings = pack.nodes.model_files.LayerSettings(dtype, mm.unet_manual_cast(dtype, device), None)
        layers = {k: v for k, v in settings.build_arguments().items() if k in ("attention", "operations")}
        xpsr_cn = randomize(SFAControlNet(ControlNetConfig.from_dict(sd15 | {"use_lowlevel_prompt": True}), **layers,
                                          dtype=dtype), 2)
        conditional = randomize(ConditionalAttention(UNetConfig.from_dict(sd15), **layers, dtype=dtype), 3)
        xpsr = pack.nodes.control.XPSRControlNet(xpsr_cn, dtype, load_device=device,
                                                 manual_cast_dtype=settings.manual_cast_dtype)
        patched = pack.nodes.unet_patch.patch_model(
            model, patcher(conditional, load_device=device, offload_device=offload))
    return model, stock, patched, xpsr


def one_step(model, control, latent: int, with_lowlevel: bool) -> float:
    """One sampler step with CFG (cond + uncond in one batch of 2) through ComfyUI's sampling machinery."""
    import comfy.conds
    import comfy.sample
    import comfy.samplers
    import nodes

    context = torch.randn(1, 77, 768)
    extra = {"model_conds": {"xpsr_lowlevel": comfy.conds.CONDCrossAttn(torch.randn(1, 77, 768))}} \
        if with_lowlevel else {}
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        [[context, dict(extra)]], [[context * 0.5, dict(extra)]], control, torch.rand(1, latent * 8, latent * 8, 3),
        1.0, 0.0, 1.0)
    sigmas = torch.tensor([10.0, 0.0])
    noise = torch.zeros(1, 4, latent, latent)
    start = time.perf_counter()
    comfy.sample.sample_custom(model, noise, 4.5, comfy.samplers.sampler_object("euler"), sigmas, positive, negative,
                               torch.randn(1, 4, latent, latent), disable_pbar=True, seed=0)
    return time.perf_counter() - start


def step_ratio(models: tuple, sizes: list[int], repeats: int) -> list[dict]:
    model, stock, patched, xpsr = models
    rows = []
    for latent in sizes:
        runs = {"stock": (model, stock, False), "xpsr": (patched, xpsr, True)}
        for m, c, low in runs.values():
            one_step(m, c, latent, low)
        flops = {}
        for name, (m, c, low) in runs.items():
            with FlopCounterMode(display=False) as counter:
                one_step(m, c, latent, low)
            flops[name] = counter.get_total_flops()
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, (m, c, low) in runs.items():
                times[name].append(one_step(m, c, latent, low))
        median = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"latent": latent, "output_px": latent * 8, "time_ratio": median["xpsr"] / median["stock"],
                     "flop_ratio": flops["xpsr"] / flops["stock"], "xpsr_gflops": flops["xpsr"] / 1e9,
                     "stock_gflops": flops["stock"] / 1e9})
    return rows


def reset_peak() -> int:
    """Start a new peak-memory window (CUDA's allocator peak, or Linux's peak RSS); returns the memory in use."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    open("/proc/self/clear_refs", "w").write("5")
    return read_peak()


def read_peak() -> int:
    """The peak since the last reset_peak: torch.cuda.max_memory_allocated, or Linux's VmHWM."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


def peak_memory(run) -> int:
    """Peak memory growth during ``run()``."""
    before = reset_peak()
    run()
    return read_peak() - before


def step_memory(models: tuple, outputs: list[int]) -> list[dict]:
    """Peak memory of one XPSR step (CFG batch 2, weights already loaded) at each output size."""
    _, _, patched, xpsr = models
    one_step(patched, xpsr, outputs[0] // 8, True)
    rows = [{"output_px": px, "peak_bytes": peak_memory(lambda px=px: one_step(patched, xpsr, px // 8, True))}
            for px in outputs]
    for row in rows:
        row["per_pixel_ratio"] = (row["peak_bytes"] / row["output_px"] ** 2) / (rows[0]["peak_bytes"] /
                                                                                rows[0]["output_px"] ** 2)
    return rows


def tiled_throughput(pack, models: tuple, outputs: list[int], tile: int, overlap: int) -> list[dict]:
    """Time of one tiled XPSR step per output megapixel and per processed (tile) megapixel, relative to the first."""
    import comfy.patcher_extension

    tiling = importlib.import_module(f"{pack.__name__}.xpsr_core.pipeline.tiling")
    _, _, patched, xpsr = models
    model = patched.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "bench_tiles",
                               pack.nodes.tiled_sampling.TiledCondBatch(tile, overlap))
    one_step(model, xpsr, outputs[0] // 8, True)
    rows = []
    for px in outputs:
        latent = px // 8
        boxes = tiling.tile_boxes(latent, latent, tile, overlap) if tiling.needs_tiling(latent, latent, tile) else []
        processed = sum((b.y1 - b.y0) * (b.x1 - b.x0) for b in boxes) * 64 or px * px
        seconds = one_step(model, xpsr, latent, True)
        rows.append({"output_px": px, "tiles": max(1, len(boxes)), "seconds": seconds,
                     "s_per_output_mp": seconds / (px * px / 1e6), "s_per_processed_mp": seconds / (processed / 1e6)})
    for row in rows:
        row["per_output_mp_ratio"] = row["s_per_output_mp"] / rows[0]["s_per_output_mp"]
        row["per_processed_mp_ratio"] = row["s_per_processed_mp"] / rows[0]["s_per_processed_mp"]
    return rows


def compile_cost(models: tuple, latent: int, repeats: int, backend: str) -> dict:
    """TorchCompileModel's compile (comfy_api's set_torch_compile_wrapper) on the stock model + ControlNet and on
    XPSR: the first step (cold compile, Dynamo reset before each) and the steady step, as XPSR / stock ratios."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model, stock, patched, xpsr = models
    rows = {}
    for name, (m, c, low) in {"stock": (model, stock, False), "xpsr": (patched, xpsr, True)}.items():
        torch._dynamo.reset()
        counters.clear()
        compiled = m.clone()
        set_torch_compile_wrapper(compiled, backend=backend)
        first = one_step(compiled, c, latent, low)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        steady = statistics.median(one_step(compiled, c, latent, low) for _ in range(repeats))
        rows[name] = {"first_s": first, "steady_s": steady, "graphs": graphs, "graph_breaks": breaks,
                      "recompiled_after_first": counters["stats"]["unique_graphs"] - graphs}
    torch._dynamo.reset()
    return {"latent": latent, "backend": backend, **rows,
            "first_ratio": rows["xpsr"]["first_s"] / rows["stock"]["first_s"],
            "steady_ratio": rows["xpsr"]["steady_s"] / rows["stock"]["steady_s"]}


def tile_batching(pack, models: tuple, outputs: list[int], tile: int, overlap: int, repeats: int) -> list[dict]:
    """Time of one tiled XPSR step with every tile evaluated in its own model call (serial) and with as many tiles
    per call as ComfyUI's memory estimate allows (batched), per output size. The two alternate within each repeat
    (this machine's load drifts), each repeat giving its own ratio; the median ratio is the figure."""
    import comfy.patcher_extension

    _, _, patched, xpsr = models
    rows = []
    for px in outputs:
        variants = {}
        for name, max_tiles in (("serial", 1), ("batched", None)):
            tiler = pack.nodes.tiled_sampling.TiledCondBatch(tile, overlap, max_tiles=max_tiles)
            model = patched.clone()
            model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "bench_tiles", tiler)
            batches: list[int] = []

            def count(apply_model, args, batches=batches):
                batches.append(args["input"].shape[0])
                return apply_model(args["input"], args["timestep"], **args["c"])

            model.set_model_unet_function_wrapper(count)
            one_step(model, xpsr, px // 8, True)
            variants[name] = (model, list(batches))
        times: dict[str, list[float]] = {"serial": [], "batched": []}
        for _ in range(repeats):
            for name, (model, _) in variants.items():
                times[name].append(one_step(model, xpsr, px // 8, True))
        ratios = [b / s for b, s in zip(times["batched"], times["serial"], strict=True)]
        rows.append({"output_px": px, "tiles": tiler.tile_count(px // 8, px // 8),
                     "rows_per_call": {name: calls for name, (_, calls) in variants.items()},
                     "serial_s": statistics.median(times["serial"]), "batched_s": statistics.median(times["batched"]),
                     "ratios": ratios, "batched_over_serial": statistics.median(ratios)})
    return rows


class StepTimer:
    """PREDICT_NOISE wrapper on a MODEL: the time of every sampler step (one CFG model evaluation, synchronised on
    CUDA, so weights streamed under --lowvram/--novram count) and the peak memory from the first step's start to
    the last step's end (the window starts at the first step; the peak before it is kept in ``before_sampling``)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds: list[float] = []
        self.started = False
        self.before_sampling = 0
        self.sampling_peak = 0

    def __call__(self, executor, *args, **kwargs):
        if not self.started:
            self.started = True
            self.before_sampling = read_peak()
            reset_peak()
        start = time.perf_counter()
        out = executor(*args, **kwargs)
        self.sampling_peak = read_peak()
        self.seconds.append(time.perf_counter() - start)
        return out


def register_graph_nodes(outputs: tuple) -> None:
    """Nodes that hand the in-memory models to a graph (nothing is read from disk), make a smooth random image, and
    take an IMAGE as the graph's output without saving it."""
    import nodes

    class BenchModels:
        RETURN_TYPES = ("MODEL", "CONTROL_NET", "MODEL", "XPSR_CONTROLNET", "CLIP", "VAE")
        FUNCTION = "get"
        CATEGORY = "benchmark"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def get(self):
            return outputs

    class BenchImage:
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "make"
        CATEGORY = "benchmark"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"size": ("INT", {"default": 64, "min": 8, "max": 8192})}}

        def make(self, size: int):
            small = torch.rand(1, 3, max(2, size // 8), max(2, size // 8), generator=torch.Generator().manual_seed(0))
            return (torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear").movedim(1, -1),)

    class BenchSink:
        RETURN_TYPES = ()
        FUNCTION = "take"
        OUTPUT_NODE = True
        CATEGORY = "benchmark"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"images": ("IMAGE",)}}

        def take(self, images):
            return {}

    for node in (BenchModels, BenchImage, BenchSink):
        nodes.NODE_CLASS_MAPPINGS[f"XPSR{node.__name__}"] = node


def xpsr_graph(prompts, px: int, steps: int) -> dict:
    """LR image (px / 4) -> XPSR Dual Prompt Encode -> XPSR Sampler (official settings, x4, whole latent) -> sink."""
    return {
        "1": {"class_type": "XPSRBenchModels", "inputs": {}},
        "2": {"class_type": "XPSRBenchImage", "inputs": {"size": px // 4}},
        "3": {"class_type": "XPSRDualPromptEncode", "inputs": {
            "clip": ["1", 4], "high_level": "a photo of a brick house by a lake", "low_level": "blurry, noisy",
            "added_prompt": prompts.ADDED_PROMPT, "negative_high": prompts.NEGATIVE_HIGH,
            "negative_low": prompts.NEGATIVE_LOW, "token_mode": "official", "lowlevel_cfg": "official"}},
        "4": {"class_type": "XPSRSampler", "inputs": {
            "model": ["1", 2], "xpsr_controlnet": ["1", 3], "positive": ["3", 0], "negative": ["3", 1],
            "image": ["2", 0], "vae": ["1", 5], "scale": 4.0, "process_size": px, "seed": 0, "steps": steps,
            "cfg": 4.5, "sampler_name": "ddpm", "scheduler": "xpsr_official", "start": "official", "denoise": 1.0,
            "control_strength": 1.0, "tile_size": 320, "tile_overlap": 8, "vae_tiling": "auto", "color_fix": "adain"}},
        "5": {"class_type": "XPSRBenchSink", "inputs": {"images": ["4", 0]}},
    }


def stock_graph(px: int, steps: int) -> dict:
    """CLIP Text Encode x2 -> Apply ControlNet (hint at px) -> KSampler (empty latent, ddpm) -> VAE Decode -> sink."""
    return {
        "1": {"class_type": "XPSRBenchModels", "inputs": {}},
        "2": {"class_type": "XPSRBenchImage", "inputs": {"size": px}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 4],
                                                          "text": "a photo of a brick house by a lake"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 4], "text": "blurry, noisy"}},
        "5": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["3", 0], "negative": ["4", 0], "control_net": ["1", 1], "image": ["2", 0], "strength": 1.0,
            "start_percent": 0.0, "end_percent": 1.0}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": steps, "cfg": 4.5, "sampler_name": "ddpm", "scheduler": "normal",
            "positive": ["5", 0], "negative": ["5", 1], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 5]}},
        "9": {"class_type": "XPSRBenchSink", "inputs": {"images": ["8", 0]}},
    }


def execute_graph(prompt: dict) -> None:
    """Validate and run an API prompt in a fresh PromptExecutor (nothing cached from the previous run), as the
    batch command runs its graphs."""
    sys.path.insert(0, str(REPO / "scripts"))
    import upscale_folder

    upscale_folder.execute(upscale_folder.headless_executor(), prompt)


def clip_and_vae(dtype: torch.dtype):
    """SD1.5's CLIP-L text encoder and VAE, ComfyUI's classes with random weights (built in memory)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from comfy.ldm.models.autoencoder import AutoencoderKL

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    with allocated_weights():
        clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
        randomize(clip.cond_stage_model, 4)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        state = randomize(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), 5).state_dict()
    vae = comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}}, dtype=dtype)
    return clip, vae


def graph_run(prompt: dict, timer: StepTimer) -> dict:
    """One graph from nothing loaded: its peak memory (whole graph, and sampling alone), time per step, wall time."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    timer.reset()
    start_bytes = reset_peak()
    start = time.perf_counter()
    execute_graph(prompt)
    wall = time.perf_counter() - start
    return {"peak_bytes": max(timer.before_sampling, read_peak()), "sampling_peak_bytes": timer.sampling_peak,
            "start_bytes": start_bytes, "steps": len(timer.seconds), "first_step_s": timer.seconds[0],
            "step_s": statistics.median(timer.seconds[1:] or timer.seconds), "wall_s": wall}


def graph_cost(pack, models: tuple, dtype: torch.dtype, outputs: list[int], steps: int) -> list[dict]:
    """Whole graphs as a user runs them, through ComfyUI's executor with everything unloaded before each: the XPSR
    Sampler graph and a stock SD1.5 + ControlNet KSampler graph at each output size; peak memory and the median
    time of a step after the first, XPSR over stock. Run once per VRAM launch flag (--vram), each in its own process:
    the flags are read when ComfyUI is imported."""
    import comfy.patcher_extension

    model, stock, patched, xpsr = models
    timer = StepTimer()
    timed = []
    for m in (model, patched):
        clone = m.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, "bench_steps", timer)
        timed.append(clone)
    clip, vae = clip_and_vae(dtype)
    register_graph_nodes((timed[0], stock, timed[1], xpsr, clip, vae))
    prompts = importlib.import_module(f"{pack.__name__}.xpsr_core.pipeline.prompts")
    rows = []
    for px in outputs:
        runs = {"stock": graph_run(stock_graph(px, steps), timer),
                "xpsr": graph_run(xpsr_graph(prompts, px, steps), timer)}
        rows.append({"output_px": px, **runs,
                     "step_ratio": runs["xpsr"]["step_s"] / runs["stock"]["step_s"],
                     "peak_ratio": runs["xpsr"]["peak_bytes"] / runs["stock"]["peak_bytes"],
                     "sampling_peak_ratio": runs["xpsr"]["sampling_peak_bytes"] / runs["stock"]["sampling_peak_bytes"]})
    return rows


def weight_memory(pack) -> dict:
    """Bytes of the XPSR parts (SFA-ControlNet + conditional attention, SD1.5 sizes) stored in fp16 and in fp8
    (built on the meta device: sizes only)."""
    import comfy.model_management
    import comfy.ops

    core = importlib.import_module(f"{pack.__name__}.xpsr_core")
    sd15 = importlib.import_module(f"{pack.__name__}.xpsr_core.models.sd15_configs").UNET
    sizes = {}
    for name, dtype in (("fp16", torch.float16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        with torch.device("meta"), allocated_weights():
            parts = [core.SFAControlNet(core.ControlNetConfig.from_dict(sd15 | {"use_lowlevel_prompt": True}),
                                        operations=comfy.ops.manual_cast, dtype=dtype),
                     core.ConditionalAttention(core.UNetConfig.from_dict(sd15), operations=comfy.ops.manual_cast,
                                               dtype=dtype)]
        sizes[name] = sum(comfy.model_management.module_size(p) for p in parts)
    return {"fp16_bytes": sizes["fp16"], "fp8_bytes": sizes["fp8_e4m3fn"],
            "fp8_over_fp16": sizes["fp8_e4m3fn"] / sizes["fp16"]}


def caption_cost(pack, images: int = 4, tokens: int = 32) -> dict:
    """Tiny-LLaVA caption time per image and the MLLM's load + unload overhead, as a ratio to it."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    import folder_paths

    import tiny_vlm

    base = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    tiny_vlm.build_llava(base / "llava-tiny")
    folder_paths.folder_names_and_paths["LLM"] = ([str(base)], set())
    caption = pack.nodes.caption
    pictures = [caption.to_pil(torch.rand(64, 64, 3)) for _ in range(images)]
    mllm = caption.load_mllm("llava-tiny", "fp32", False)
    describe = [("Describe.", importlib.import_module(f"{pack.__name__}.xpsr_core.captioning.mllm").Decoding(tokens))]
    list(caption.captions(mllm, pictures[:1], 1, describe, 1, True))
    start = time.perf_counter()
    list(caption.captions(mllm, pictures, images, describe, 1, True))
    per_image = (time.perf_counter() - start) / images
    start = time.perf_counter()
    mllm.unload()
    mllm.load()
    overhead = time.perf_counter() - start
    mllm.unload()
    return {"images": images, "new_tokens": tokens, "seconds_per_image": per_image,
            "load_unload_seconds": overhead, "load_unload_over_caption": overhead / per_image}


def caption_batching(pack, sizes: tuple[int, ...] = (1, 4, 16), images: int = 16, tokens: int = 16,
                     repeats: int = 3) -> list[dict]:
    """Tiny-LLaVA captions per second with both XPSR instructions (greedy) at each batch size (images per generate
    call; the best of ``repeats`` passes after a warm-up pass), and the ratio to one image at a time, in one run."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_vlm

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    mllm = importlib.import_module(f"{pack.__name__}.xpsr_core.captioning.mllm")
    captions = importlib.import_module(f"{pack.__name__}.xpsr_core.captioning.captions")
    model = mllm.load_caption_model(tiny_vlm.build_llava(Path(tempfile.mkdtemp(prefix="bench_batch_")) / "llava"),
                                    torch.float32)
    g = torch.Generator().manual_seed(0)
    pictures = [pack.nodes.caption.to_pil(torch.rand(64, 64, 3, generator=g)) for _ in range(images)]
    asked = [(captions.HIGH_LEVEL_INSTRUCTION, mllm.Decoding(tokens)), (captions.LOW_LEVEL_INSTRUCTION,
                                                                         mllm.Decoding(tokens))]
    rows = []
    for size in sizes:
        list(mllm.caption_rows(model, pictures, asked, size))  # a whole pass first: CPU kernels warm up per shape
        seconds = min(timed(lambda size=size: list(mllm.caption_rows(model, pictures, asked, size)))
                      for _ in range(repeats))
        rows.append({"batch": size, "captions": images * len(asked), "new_tokens": tokens, "seconds": seconds,
                     "captions_per_second": images * len(asked) / seconds})
    for row in rows:
        row["speedup"] = row["captions_per_second"] / rows[0]["captions_per_second"]
    return rows


def caption_tiles(pack, lr_sides: tuple[int, ...] = (128, 256, 512), tile: int = 64, overlap: int = 8,
                  tokens: int = 16, batch: int = 8, model_folder: Path | None = None,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Captioning an LR image whole and per latent tile (XPSR Tile Grid's crops of the processed image, both
    instructions, greedy, ``batch`` pictures per generate call): seconds per megapixel of the processed image, and
    per tile over whole, in one run. The captioner is tiny LLaVA, or the model folder given (a real-size one). A VLM
    resizes every picture to its own input size, so a caption costs about the same whatever its pixels: the ratio
    follows the tile count."""
    import tempfile

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_vlm

    mllm = importlib.import_module(f"{pack.__name__}.xpsr_core.captioning.mllm")
    captions = importlib.import_module(f"{pack.__name__}.xpsr_core.captioning.captions")
    tiling = importlib.import_module(f"{pack.__name__}.xpsr_core.pipeline.tiling")
    folder = model_folder or tiny_vlm.build_llava(Path(tempfile.mkdtemp(prefix="bench_tiles_")) / "llava")
    model = mllm.load_caption_model(folder, dtype if model_folder else torch.float32)
    asked = [(captions.HIGH_LEVEL_INSTRUCTION, mllm.Decoding(tokens)), (captions.LOW_LEVEL_INSTRUCTION,
                                                                         mllm.Decoding(tokens))]
    to_pil = pack.nodes.caption.to_pil
    g = torch.Generator().manual_seed(0)
    rows = []
    for side in lr_sides:
        lr = torch.rand(1, side, side, 3, generator=g)
        grid = tiling.processing_tile_grid(side, side, 4.0, 512, tile, overlap)
        crops = pack.nodes.tile_grid.tile_crops(lr, grid)
        pictures = {"whole": [to_pil(lr[0])], "tiles": [to_pil(c) for c in crops]}
        seconds = {}
        for name, batch_pictures in pictures.items():
            list(mllm.caption_rows(model, batch_pictures[:1], asked, batch))  # CPU kernels warm up per shape
            start = time.perf_counter()
            list(mllm.caption_rows(model, batch_pictures, asked, batch))
            seconds[name] = time.perf_counter() - start
        megapixels = grid.height * grid.width / 1e6
        rows.append({"output_px": grid.width, "tiles": grid.count, "megapixels": megapixels,
                     "whole_s_per_mp": seconds["whole"] / megapixels, "tiles_s_per_mp": seconds["tiles"] / megapixels,
                     "tiles_over_whole": seconds["tiles"] / seconds["whole"]})
    return {"model": model_folder.name if model_folder else "tiny LLaVA", "rows": rows}


ATTENTION_PROBE = textwrap.dedent("""
    import sys, torch
    from xpsr_core.models.attention import Transformer2D

    def peak_rss():
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024

    side = int(sys.argv[1])
    attention = Transformer2D(320, 320, 8)
    with torch.no_grad():
        hidden, residual = torch.randn(1, 320, side, side), torch.randn(1, 320, side, side)
        open("/proc/self/clear_refs", "w").write("5")
        before = peak_rss()
        attention(hidden, residual.flatten(2).transpose(1, 2))
    print(peak_rss() - before)
""")


def attention_memory(sides: list[int]) -> list[dict]:
    """Peak memory of one full-resolution conditional attention at SD1.5's last decoder level (320 channels, 8
    heads): linear in tokens unless the attention matrix is materialised. Linux's peak-RSS counter is reset
    just before the call, so import-time peaks do not hide it."""
    rows = []
    for side in sides:
        run = subprocess.run([sys.executable, "-c", ATTENTION_PROBE, str(side)], capture_output=True, text=True,
                             cwd=REPO, check=True)
        peak = int(run.stdout.strip())
        rows.append({"tokens": side * side, "peak_bytes": peak, "bytes_per_token": peak / (side * side)})
    base = rows[0]["bytes_per_token"]
    for row in rows:
        row["per_token_ratio"] = row["bytes_per_token"] / base
    return rows


SECTIONS = ("attention_memory", "step", "step_memory", "tiled", "compile", "tile_batching", "graph", "weight_memory",
            "caption", "caption_batching", "caption_tiles")


def markdown(results: dict) -> str:
    lines = [f"Device {results['device']}, torch {results['torch']}, ComfyUI attention {results['attention_backend']}"
             f"{' with an override' if results['override'] else ''}, {results['dtype']}, VRAM mode {results['vram']}, "
             f"dynamic VRAM {'on' if results['dynamic_vram'] else 'off'}."]
    if "step" in results:
        lines += ["", "## One sampling step (CFG batch 2), XPSR over stock SD1.5 + ControlNet", "",
                  "| latent | output | time ratio | FLOP ratio | XPSR GFLOPs | stock GFLOPs |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['latent']}x{r['latent']} | {r['output_px']} px | {r['time_ratio']:.3f} | "
                  f"{r['flop_ratio']:.3f} | {r['xpsr_gflops']:.0f} | {r['stock_gflops']:.0f} |"
                  for r in results["step"]]
    if "attention_memory" in results:
        lines += ["", "## Conditional attention peak memory per token (relative to the smallest)", "",
                  "| tokens | peak MiB | per-token ratio |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['peak_bytes'] / 2**20:.1f} | {r['per_token_ratio']:.2f} |"
                  for r in results["attention_memory"]]
    if "step_memory" in results:
        lines += ["", "## Peak memory of one XPSR step (relative per pixel to the smallest output)", "",
                  "| output | peak MiB | per-pixel ratio |", "|---|---|---|"]
        lines += [f"| {r['output_px']} px | {r['peak_bytes'] / 2**20:.0f} | {r['per_pixel_ratio']:.2f} |"
                  for r in results["step_memory"]]
    if "tiled" in results:
        lines += ["", "## One tiled XPSR step: time per megapixel (relative to the smallest output)", "",
                  "| output | tiles | seconds | per output MP | per processed MP |", "|---|---|---|---|---|"]
        lines += [f"| {r['output_px']} px | {r['tiles']} | {r['seconds']:.1f} | {r['per_output_mp_ratio']:.2f} | "
                  f"{r['per_processed_mp_ratio']:.2f} |" for r in results["tiled"]]
    if "compile" in results:
        c = results["compile"]
        lines += ["", f"## TorchCompileModel ({c['backend']}, latent {c['latent']}), "
                      "XPSR over stock SD1.5 + ControlNet",
                  "", "| | first step s | steady step s | graphs | graph breaks | recompiled after first |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {c[n]['first_s']:.1f} | {c[n]['steady_s']:.2f} | {c[n]['graphs']} | "
                  f"{c[n]['graph_breaks']} | "
                  f"{c[n]['recompiled_after_first']} |" for n in ("stock", "xpsr")]
        lines += ["", f"First-compile ratio {c['first_ratio']:.2f}, steady-step ratio {c['steady_ratio']:.2f}."]
    if "tile_batching" in results:
        lines += ["", "## Latent tiles: one model call per tile vs batched (one XPSR step)", "",
                  "| output | tiles | rows per call (batched) | serial s | batched s | batched / serial (median) | "
                  "per repeat |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['output_px']} px | {r['tiles']} | {r['rows_per_call']['batched']} | {r['serial_s']:.2f} | "
                  f"{r['batched_s']:.2f} | {r['batched_over_serial']:.2f} | "
                  f"{', '.join(f'{x:.2f}' for x in r['ratios'])} |" for r in results["tile_batching"]]
    if "graph" in results:
        lines += ["", "## Whole graphs: XPSR Sampler vs stock SD1.5 + ControlNet KSampler (from nothing loaded)", "",
                  "| output | graph | peak MiB | sampling peak MiB | s per step | first step s | graph s |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["graph"]:
            lines += [f"| {r['output_px']} px | {name} | {g['peak_bytes'] / 2**20:.0f} | "
                      f"{g['sampling_peak_bytes'] / 2**20:.0f} | {g['step_s']:.3f} | {g['first_step_s']:.3f} | "
                      f"{g['wall_s']:.1f} |" for name, g in ((n, r[n]) for n in ("stock", "xpsr"))]
        lines += [""] + [f"{r['output_px']} px, XPSR over stock: step time {r['step_ratio']:.2f}, peak "
                         f"{r['peak_ratio']:.2f}, sampling peak {r['sampling_peak_ratio']:.2f}."
                         for r in results["graph"]]
    if "weight_memory" in results:
        w = results["weight_memory"]
        lines += ["", "## XPSR weights (SFA-ControlNet + conditional attention)", "",
                  f"fp16 {w['fp16_bytes'] / 2**20:.0f} MiB, fp8_e4m3fn {w['fp8_bytes'] / 2**20:.0f} MiB "
                  f"(ratio {w['fp8_over_fp16']:.2f})"]
    if "caption" in results:
        c = results["caption"]
        lines += ["", "## Captioning (tiny LLaVA)", "",
                  f"{c['seconds_per_image']:.3f} s per image ({c['new_tokens']} new tokens); load + unload "
                  f"{c['load_unload_seconds']:.3f} s = {c['load_unload_over_caption']:.2f} captions"]
    if "caption_batching" in results:
        lines += ["", "## Batched captioning (tiny LLaVA, both instructions, greedy)", "",
                  "| images per batch | captions/s | over batch 1 |", "|---|---|---|"]
        lines += [f"| {r['batch']} | {r['captions_per_second']:.2f} | {r['speedup']:.2f} |"
                  for r in results["caption_batching"]]
    if "caption_tiles" in results:
        lines += ["", f"## Captions per latent tile vs of the whole image ({results['caption_tiles']['model']}, both "
                  "instructions, greedy)", "",
                  "| output | tiles | whole s/MP | per tile s/MP | per tile / whole |", "|---|---|---|---|---|"]
        lines += [f"| {r['output_px']} px | {r['tiles']} | {r['whole_s_per_mp']:.3f} | {r['tiles_s_per_mp']:.3f} | "
                  f"{r['tiles_over_whole']:.2f} |" for r in results["caption_tiles"]["rows"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64", help="latent sizes of the step benchmark")
    parser.add_argument("--attention-sides", default="64,128,192", help="feature-map sides of the memory probe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-outputs", default="512,1024", help="output sizes of the step-memory benchmark")
    parser.add_argument("--tiled-outputs", default="512,1024,2048", help="output sizes of the tiled benchmark")
    parser.add_argument("--tile", type=int, default=64,
                        help="latent tile size of the tiled benchmark (the 512 px output is one tile, so work per "
                             "processed pixel is equal)")
    parser.add_argument("--overlap", type=int, default=8, help="latent tile overlap of the tiled benchmark")
    parser.add_argument("--compile-latent", type=int, default=32, help="latent size of the compile benchmark")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (TorchCompileModel's: "
                                                                      "inductor)")
    parser.add_argument("--batching-outputs", default="1024,2048", help="output sizes of the tile-batching benchmark")
    parser.add_argument("--graph-outputs", default="512,2048", help="output sizes of the whole-graph benchmark")
    parser.add_argument("--graph-steps", type=int, default=4, help="sampling steps of each whole graph (at least 2: "
                                                                   "the first step is timed apart)")
    parser.add_argument("--channels", type=int, default=320,
                        help="the UNet's first-level channels (SD1.5: 320; e.g. 32 for a quick smoke run on a CPU)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--attention", choices=("pytorch", "comfy-default"), default="pytorch",
                        help="ComfyUI's attention backend: pytorch (SDPA, ComfyUI's choice on NVIDIA GPUs) or what "
                             "ComfyUI picks by default on this device (sub-quadratic on a CPU)")
    parser.add_argument("--sections", type=cli.names_of(SECTIONS, "section"), default=",".join(SECTIONS),
                        help=f"some of {','.join(SECTIONS)}")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and compute of every model")
    parser.add_argument("--override", action="store_true",
                        help="install a passthrough optimized_attention_override on the MODELs (as sage/flash "
                             "nodes do)")
    parser.add_argument("--vram", choices=("lowvram", "novram"), help="ComfyUI's VRAM launch flag")
    parser.add_argument("--caption-model", type=Path,
                        help="a real-size VLM folder (transformers) for the caption_tiles section; tiny LLaVA without")
    parser.add_argument("--dynamic-vram", action="store_true",
                        help="start ComfyUI's dynamic VRAM as its main.py does (0.16 and later, NVIDIA); without it "
                             "the models run as under --disable-dynamic-vram")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout: the step benchmark runs ComfyUI's own models")
    sections = args.sections
    pack = import_comfy(args.attention == "pytorch", args.vram, args.dynamic_vram)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    models = build(pack, dtype, args.override, args.channels) if {
        "step", "step_memory", "tiled", "compile", "tile_batching", "graph"} & set(sections) else None

    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    runs = {
        "attention_memory": lambda: attention_memory(ints(args.attention_sides)),
        "step": lambda: step_ratio(models, ints(args.sizes), args.repeats),
        "step_memory": lambda: step_memory(models, ints(args.memory_outputs)),
        "tiled": lambda: tiled_throughput(pack, models, ints(args.tiled_outputs), args.tile, args.overlap),
        "compile": lambda: compile_cost(models, args.compile_latent, args.repeats, args.compile_backend),
        "tile_batching": lambda: tile_batching(pack, models, ints(args.batching_outputs), args.tile, args.overlap,
                                               args.repeats),
        "graph": lambda: graph_cost(pack, models, dtype, ints(args.graph_outputs), args.graph_steps),
        "weight_memory": lambda: weight_memory(pack),
        "caption": lambda: caption_cost(pack),
        "caption_batching": lambda: caption_batching(pack),
        "caption_tiles": lambda: caption_tiles(pack, tile=args.tile, overlap=args.overlap,
                                               model_folder=args.caption_model, dtype=dtype),
    }
    results = {"device": str(sys.modules["comfy.model_management"].get_torch_device()), "torch": torch.__version__,
               "attention_backend": args.attention, "dtype": args.dtype, "channels": args.channels,
               "override": args.override, "vram": args.vram or "normal", "dynamic_vram": dynamic_vram_on()}
    for name in (name for name in SECTIONS if name in sections):
        results[name] = runs[name]()
        report.save(args.out, results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
