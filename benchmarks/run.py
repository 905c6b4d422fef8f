"""Benchmarks of XPSR in ComfyUI against the stock SD1.5 + ControlNet it extends.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/run.py [--sizes 32,64] [--repeats 3] [--out benchmarks/results]

Every figure is a ratio measured within one run (these machines are noisy): the time of one
sampling step (CFG batch 2) of XPSR (patched MODEL + SFA-ControlNet) over the stock model
with a stock ControlNet, beside the ratio of their FLOPs; and the conditional attention's
peak memory per token at growing token counts (linear memory gives a flat ratio). SD1.5
sizes, random weights. Results go to results.json and results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_DIFFUSERS = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
                  "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel."""
    return sdpa_flop_count(query, key, value)


def import_comfy():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    import nodes

    asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    return sys.modules[str(REPO).replace(".", "_x_")]


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


def build(pack):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    core = importlib.import_module(f"{pack.__name__}.xpsr_core")
    ConditionalAttention, ControlNetConfig = core.ConditionalAttention, core.ControlNetConfig
    SFAControlNet, UNetConfig = core.SFAControlNet, core.UNetConfig

    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=offload)
    randomize(base.diffusion_model)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=offload)

    stock_cn = randomize(comfy.cldm.cldm.ControlNet(hint_channels=3, **{k: v for k, v in SD15_UNET.items()
                                                                        if k != "transformer_depth_output"}), 1)
    stock = comfy.controlnet.ControlNet(stock_cn, load_device=device)

    nodes_control = pack.nodes.control
    unet_patch = pack.nodes.unet_patch
    attention_fn = sys.modules["comfy.ldm.modules.attention"].optimized_attention
    xpsr_cn = randomize(SFAControlNet(ControlNetConfig.from_dict(SD15_DIFFUSERS | {"use_lowlevel_prompt": True}),
                                      attention=attention_fn), 2)
    conditional = randomize(ConditionalAttention(UNetConfig.from_dict(SD15_DIFFUSERS), attention=attention_fn), 3)
    xpsr = nodes_control.XPSRControlNet(nodes_control.ControlModel(xpsr_cn, torch.float32), load_device=device)
    patched = unet_patch.patch_model(model, comfy.model_patcher.ModelPatcher(conditional, load_device=device,
                                                                             offload_device=offload))
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


def step_ratio(pack, sizes: list[int], repeats: int) -> list[dict]:
    model, stock, patched, xpsr = build(pack)
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


ATTENTION_PROBE = textwrap.dedent("""
    import sys, torch
    from xpsr_core.attention import Transformer2D

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


def markdown(results: dict) -> str:
    lines = ["## One sampling step (CFG batch 2), XPSR over stock SD1.5 + ControlNet", "",
             "| latent | output | time ratio | FLOP ratio | XPSR GFLOPs | stock GFLOPs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['latent']}x{r['latent']} | {r['output_px']} px | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} "
              f"| {r['xpsr_gflops']:.0f} | {r['stock_gflops']:.0f} |" for r in results["step"]]
    lines += ["", "## Conditional attention peak memory per token (relative to the smallest)", "",
              "| tokens | peak MiB | per-token ratio |", "|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['peak_bytes'] / 2**20:.1f} | {r['per_token_ratio']:.2f} |"
              for r in results["attention_memory"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64", help="latent sizes of the step benchmark")
    parser.add_argument("--attention-sides", default="64,128,192", help="feature-map sides of the memory probe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout: the step benchmark runs ComfyUI's own models")
    pack = import_comfy()
    results = {
        "device": str(sys.modules["comfy.model_management"].get_torch_device()),
        "torch": torch.__version__,
        "attention_memory": attention_memory([int(s) for s in args.attention_sides.split(",")]),
        "step": step_ratio(pack, [int(s) for s in args.sizes.split(",")], args.repeats),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
