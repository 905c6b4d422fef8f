"""The core models' speed against diffusers' stock SD1.5 UNet + ControlNet, per FLOP.

    python benchmarks/core_speed.py [--sizes 32,64] [--repeats 3] [--threads N] [--out benchmarks/results/core]
                                    [--core-layers default|torch] [--profile]

XPSR does more work than a stock ControlNet step (three attentions per SFA layer, a
conditional attention after every decoder layer), so its time alone says nothing about
overhead. What does is the time ratio beside the FLOP ratio: a core that runs as
efficiently as diffusers' classes takes as much longer as it computes more, so
time ratio / FLOP ratio is about 1, and anything above that is overhead of the
implementation (copies, extra kernels, layouts), not of the method. (It is not exactly 1
even without overhead: XPSR's extra FLOPs are mostly attention and GEMMs, whose kernels
run at other rates than the stock step's mix.)

Both sides are built here from the SD1.5 config with the same random-weight scheme (the
weights they share are copied, so the stock UNet is the core UNet without the conditional
attention, which is checked) and run on the same inputs, which is checked at the models'
entry points. diffusers runs its SDPA processor, so both sides use
``scaled_dot_product_attention``. FLOPs come from ``FlopCounterMode`` with the attention
counted, on copies of the models on the meta device: counting costs no time, and there
SDPA decomposes into the two batched matmuls torch counts, the same count as the formula
registered in model_setup.py for the CPU flash kernel (torch counts only the CUDA ones). Times are
medians over interleaved repeats within one process (core, stock, core, stock...), after a
warm-up, since these machines are noisy and a ratio taken in one run cancels most of it.
The ControlNet's figure is the ControlNet part of the same timed steps.

The core's linear layers (``default_operations`` in xpsr_core/models/operations.py) run fp32
CPU inputs through oneDNN, diffusers' through MKL's GEMM, which is the slower of the two on
AMD CPUs; ``--core-layers torch`` builds the core from torch.nn's layers instead, the same
kernels as diffusers, so that the ratio shows the implementation's overhead alone.

On a CPU shared with other work, more intra-op threads than free cores make every kernel
wait for the descheduled threads, which inflates the side with more kernels; ``--threads 1``
measures the kernels alone. Results go to results.json and results.md.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import report  # noqa: E402
from model_setup import randomize  # noqa: E402  (registers the CPU attention's FLOPs)

from xpsr_core.models import sd15_configs  # noqa: E402
from xpsr_core.models.conditional_attention import ConditionalAttention  # noqa: E402
from xpsr_core.models.config import ControlNetConfig, UNetConfig  # noqa: E402
from xpsr_core.models.controlnet import SFAControlNet  # noqa: E402
from xpsr_core.models.operations import default_operations  # noqa: E402
from xpsr_core.models.unet import UNet2DCondition  # noqa: E402


def share_weights(source: torch.nn.Module, target: torch.nn.Module) -> int:
    """Give ``target`` ``source``'s values where keys and shapes agree (the diffusers layout is shared); returns how
    many tensors that is."""
    theirs = source.state_dict()
    ours = target.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    target.load_state_dict(shared, strict=False, assign=True)
    return len(shared)


@dataclass
class Models:
    controlnet: SFAControlNet
    unet: UNet2DCondition
    conditional: ConditionalAttention
    stock_controlnet: torch.nn.Module
    stock_unet: torch.nn.Module
    shared_tensors: dict[str, int]


def _accepted(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


CORE_LAYERS = {"default": default_operations,
               "torch": SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, GroupNorm=nn.GroupNorm,
                                        LayerNorm=nn.LayerNorm)}
"""What ``--core-layers`` builds the core models from."""


def build_models(device: str | None = None, channels: int = 320, core_layers: str = "default") -> Models:
    """The core XPSR models and diffusers' stock SD1.5 UNet + ControlNet, fp32, eval mode, with random weights;
    on the meta device (for counting FLOPs, which takes no memory and no time) without weights. ``channels`` is the
    first level's width (320 is SD1.5; fewer make the same architecture small enough for a smoke run);
    ``core_layers`` names the core's layers in ``CORE_LAYERS``."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet_raw = sd15_configs.UNET | {"block_out_channels": [channels * m for m in (1, 2, 4, 4)]}
    with torch.device(device or "cpu"):
        stock_unet = UNet2DConditionModel(**_accepted(UNet2DConditionModel, unet_raw))
        stock_cn = ControlNetModel(**_accepted(ControlNetModel, unet_raw))
        ops = CORE_LAYERS[core_layers]
        controlnet = SFAControlNet(ControlNetConfig.from_dict(unet_raw | {"use_lowlevel_prompt": True}),
                                   operations=ops)
        unet = UNet2DCondition(UNetConfig.from_dict(unet_raw), operations=ops)
        conditional = ConditionalAttention(UNetConfig.from_dict(unet_raw), operations=ops)
    for m in (stock_unet, stock_cn):
        m.set_attn_processor(AttnProcessor2_0())
    shared = {}
    if device != "meta":
        for seed, m in enumerate((stock_unet, stock_cn, controlnet, unet, conditional)):
            randomize(m, seed)
        shared = {"unet": share_weights(stock_unet, unet), "controlnet": share_weights(stock_cn, controlnet)}
    models = Models(controlnet, unet, conditional, stock_cn, stock_unet, shared)
    for m in (controlnet, unet, conditional, stock_cn, stock_unet):
        m.eval().requires_grad_(False)
    return models


@dataclass
class Inputs:
    sample: torch.Tensor
    timestep: torch.Tensor
    c_h: torch.Tensor
    c_l: torch.Tensor
    hint: torch.Tensor


def make_inputs(latent: int, batch: int = 2, seed: int = 0, device: str | None = None) -> Inputs:
    """A CFG batch (cond + uncond) at ``latent`` x ``latent``; the hint is the LR image at 8x, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = Inputs(
        sample=torch.randn(batch, 4, latent, latent, generator=g),
        timestep=torch.full((batch,), 500.0),
        c_h=torch.randn(batch, 77, 768, generator=g),
        c_l=torch.randn(batch, 77, 768, generator=g),
        hint=torch.rand(batch, 3, latent * 8, latent * 8, generator=g),
    )
    return x if device is None else Inputs(*(getattr(x, f).to(device) for f in x.__dataclass_fields__))


Step = Callable[[Inputs], tuple[torch.Tensor, float]]
"""One step: the predicted noise and the seconds its ControlNet part took."""


def core_step(models: Models) -> Step:
    def run(x: Inputs) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = models.controlnet(x.sample, x.timestep, x.c_h, x.hint, lowlevel_encoder_hidden_states=x.c_l)
        cn_s = time.perf_counter() - start
        eps = models.unet(x.sample, x.timestep, x.c_h, out.down_residuals, out.mid_residual,
                          conditional_attention=models.conditional)
        return eps, cn_s
    return run


def stock_step(models: Models) -> Step:
    def run(x: Inputs) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        down, mid = models.stock_controlnet(x.sample, x.timestep, x.c_h, x.hint, return_dict=False)
        cn_s = time.perf_counter() - start
        eps = models.stock_unet(x.sample, x.timestep, x.c_h, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid, return_dict=False)[0]
        return eps, cn_s
    return run


def check_same_inputs(models: Models, x: Inputs) -> None:
    """Fail unless both sides' ControlNets and UNets receive the same sample, timestep, prompt and hint, and the
    core UNet without the conditional attention reproduces the stock UNet (the same network on the same inputs)."""
    seen: dict[str, dict[str, Any]] = {}

    def recorder(name: str):
        def hook(module, args, kwargs):
            names = list(inspect.signature(module.forward).parameters)
            seen[name] = dict(zip(names, args, strict=False)) | kwargs
        return hook

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in (
        ("core_cn", models.controlnet), ("stock_cn", models.stock_controlnet),
        ("core_unet", models.unet), ("stock_unet", models.stock_unet))]
    try:
        with torch.no_grad():
            core_step(models)(x)
            stock_step(models)(x)
    finally:
        for h in handles:
            h.remove()
    for side in ("cn", "unet"):
        core, stock = seen[f"core_{side}"], seen[f"stock_{side}"]
        for key in ("sample", "timestep", "encoder_hidden_states") + (("controlnet_cond",) if side == "cn" else ()):
            if not torch.equal(torch.as_tensor(core[key]), torch.as_tensor(stock[key])):
                raise AssertionError(f"{side}: '{key}' differs between the core and the stock model")
    with torch.no_grad():
        down, mid = models.stock_controlnet(x.sample, x.timestep, x.c_h, x.hint, return_dict=False)
        ours = models.unet(x.sample, x.timestep, x.c_h, list(down), mid)
        theirs = models.stock_unet(x.sample, x.timestep, x.c_h, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid, return_dict=False)[0]
    err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    if err > 1e-4:
        raise AssertionError(f"the core UNet (no conditional attention) differs from the stock UNet: {err:.2e}")


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(models: Models, meta: Models, latent: int, repeats: int) -> dict[str, Any]:
    """Time and FLOP ratios, core over stock, for the whole step and for the ControlNet alone (FLOPs counted on
    ``meta``, the same models on the meta device)."""
    m = make_inputs(latent, device="meta")
    with torch.no_grad():
        flops = {"core": count_flops(lambda: core_step(meta)(m)), "stock": count_flops(lambda: stock_step(meta)(m))}
        cn_flops = {
            "core": count_flops(lambda: meta.controlnet(m.sample, m.timestep, m.c_h, m.hint,
                                                        lowlevel_encoder_hidden_states=m.c_l)),
            "stock": count_flops(lambda: meta.stock_controlnet(m.sample, m.timestep, m.c_h, m.hint,
                                                               return_dict=False)),
        }
    x = make_inputs(latent)
    steps = {"core": core_step(models), "stock": stock_step(models)}
    with torch.no_grad():
        for s in steps.values():  # warm-up (allocator, oneDNN primitive caches)
            s(x)
        step_s: dict[str, list[float]] = {n: [] for n in steps}
        cn_s: dict[str, list[float]] = {n: [] for n in steps}
        for i in range(repeats):
            for name, s in steps.items():
                start = time.perf_counter()
                _, cn = s(x)
                step_s[name].append(time.perf_counter() - start)
                cn_s[name].append(cn)
            print(f"latent {latent}, repeat {i + 1}/{repeats}: core {step_s['core'][-1]:.2f} s, "
                  f"stock {step_s['stock'][-1]:.2f} s", file=sys.stderr, flush=True)
    rows = {}
    for part, secs, fl in (("step", step_s, flops), ("controlnet", cn_s, cn_flops)):
        med = {n: statistics.median(v) for n, v in secs.items()}
        time_ratio = med["core"] / med["stock"]
        flop_ratio = fl["core"] / fl["stock"]
        rows[part] = {"time_ratio": time_ratio, "flop_ratio": flop_ratio, "over_flop_ratio": time_ratio / flop_ratio,
                      "core_s": med["core"], "stock_s": med["stock"], "core_gflops": fl["core"] / 1e9,
                      "stock_gflops": fl["stock"] / 1e9,
                      "core_runs_s": secs["core"], "stock_runs_s": secs["stock"]}
    return {"latent": latent, **rows}


def profile(models: Models, latent: int, out: Path, rows: int = 30) -> str:
    """Self time per op (and per op and input shapes) of one core and one stock step, after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = make_inputs(latent)
    text = []
    with torch.no_grad():
        for name, s in (("core", core_step(models)), ("stock", stock_step(models))):
            s(x)
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                s(x)
            by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
            by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                          row_limit=rows)
            text += [f"# {name} step, latent {latent}", by_op, f"# {name} step by input shape", by_shape]
    table = "\n".join(text)
    (out / f"profile_{latent}.txt").write_text(table)
    return table


def markdown(results: dict[str, Any]) -> str:
    lines = [f"torch {results['torch']}, diffusers {results['diffusers']}, {results['threads']} threads, fp32 CPU, "
             f"batch 2, core layers '{results['core_layers']}', {results['repeats']} interleaved repeats (median), "
             f"{results['wall_s']:.0f} s in all.", "",
             "| latent | part | time ratio | FLOP ratio | time / FLOP ratio | core GFLOPs | stock GFLOPs | core s | "
             "stock s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        for part in ("step", "controlnet"):
            p = r[part]
            lines.append(f"| {r['latent']}x{r['latent']} | {part} | {p['time_ratio']:.3f} | {p['flop_ratio']:.3f} | "
                         f"{p['over_flop_ratio']:.3f} | {p['core_gflops']:.0f} | {p['stock_gflops']:.0f} | "
                         f"{p['core_s']:.3f} | {p['stock_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,64", help="latent sizes (the output is 8x)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side and size, interleaved")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "core")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's choice)")
    parser.add_argument("--channels", type=int, default=320,
                        help="the UNet's first-level channels (SD1.5: 320; e.g. 32 for a quick smoke run)")
    parser.add_argument("--core-layers", choices=sorted(CORE_LAYERS), default="default",
                        help="the core's layers: its default (oneDNN linears on CPU) or torch.nn's, as diffusers")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler tables of one core and one stock step per size")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    import diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models = build_models(channels=args.channels, core_layers=args.core_layers)
    meta = build_models("meta", args.channels, args.core_layers)
    check_same_inputs(models, make_inputs(8))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                               "threads": torch.get_num_threads(), "repeats": args.repeats, "channels": args.channels,
                               "core_layers": args.core_layers,
                               "shared_tensors": models.shared_tensors, "sizes": []}
    for latent in sizes:
        results["sizes"].append(measure(models, meta, latent, args.repeats))
        if args.profile:
            profile(models, latent, args.out)
        results["wall_s"] = time.perf_counter() - started
        report.save(args.out, results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
