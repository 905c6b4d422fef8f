"""XPSR chains like a native ComfyUI model: attention overrides, stacked ControlNets, tiled-upscaler hints, batched
tiles, fp8 weights.

Each test runs one denoiser evaluation of the parity fixture's case through ComfyUI's sampler machinery
(test_host_parity.evaluate_once) and compares with a reference computed another way.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management as mm
import comfy.utils
import nodes as comfy_nodes
from comfy.ldm.modules.attention import CrossAttention

from parity import assert_parity, parity_fixture
from test_host_parity import conditioning, evaluate_once, with_control, xpsr_model

CASE = 3
"""The fixture case evaluated: t = 500, conditioning scale 0.6 (so 'after strength' matters), both prompts."""


def case_inputs(model, control, strength: float | None = None, **percent) -> tuple:
    """(model, positive, negative, latent, sigma) of the fixture case with the XPSR control attached."""
    case = parity_fixture().case(CASE)
    prompts = conditioning(case["c_h"], case["c_l"])
    positive, negative = H.pack_module("nodes.apply").attach_control(
        prompts, prompts, control, case["control_image"].movedim(1, -1), case.scale if strength is None else strength,
        **percent)
    sigma = model.get_model_object("model_sampling").sigmas[case["timestep"]]
    return positive, negative, case["latent"], sigma


def stock_controlnet(seed: int = 7) -> comfy.controlnet.ControlNet:
    """ComfyUI's stock ControlNet class around a random cldm ControlNet shaped like the tiny UNet.

    (comfy.controlnet.load_controlnet_state_dict cannot build it from its state dict: model
    detection reads the tiny 32-channel UNet as SD1.5's 8-head layout.)
    """
    config = H.comfy_unet_config(H.load_official(parity_fixture().checkpoint).unet_config)
    kwargs = {k: v for k, v in config.items() if k not in ("transformer_depth_output", "out_channels")}
    cldm = H._random_init(comfy.cldm.cldm.ControlNet(hint_channels=3, **kwargs), seed=seed)
    return comfy.controlnet.ControlNet(cldm, load_device=mm.get_torch_device())


def conditional_attention_of(model) -> torch.nn.Module:
    return model.get_additional_models_with_key(H.pack_module("nodes.unet_patch").PATCH_KEY)[0].model


@torch.no_grad()
def test_attention_override_sees_every_attention_of_the_unet_the_controlnet_and_the_conditional_attention():
    model, control = xpsr_model()
    core_attention = H.pack_module("xpsr_core.models.attention").Attention
    parts = {
        "unet": [m for m in model.model.diffusion_model.modules() if isinstance(m, CrossAttention)],
        "controlnet": [m for m in control.control_model.modules() if isinstance(m, core_attention)],
        "conditional_attention": [m for m in conditional_attention_of(model).modules()
                                  if isinstance(m, core_attention)],
    }
    running: list[str] = []
    module_calls: Counter = Counter()
    overridden: Counter = Counter()
    handles = [h for part, modules in parts.items() for m in modules for h in (
        m.register_forward_pre_hook(lambda module, args, part=part: running.append(part)),
        m.register_forward_hook(lambda module, args, out: module_calls.update([running.pop()])))]

    def override(attention, *args, **kwargs):
        assert "sigmas" in kwargs["transformer_options"]  # the model call's own options
        overridden[running[-1]] += 1
        return attention(*args, **kwargs)

    with_override = model.clone()
    with_override.model_options["transformer_options"]["optimized_attention_override"] = override
    try:
        eps = evaluate_once(with_override, *case_inputs(with_override, control), cfg=4.5)
    finally:
        for h in handles:
            h.remove()
    calls = module_calls["unet"] // len(parts["unet"])
    assert calls >= 1 and all(module_calls[part] == calls * len(modules) for part, modules in parts.items())
    assert overridden == module_calls
    reference = evaluate_once(model, *case_inputs(model, control), cfg=4.5)
    assert torch.equal(eps, reference)


def record_conditional_attention_context(model) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """A hook recording, per decoder layer, the residual the conditional attention takes its keys/values from."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        hidden, layer, residuals = args[:3]
        seen.append(residuals[-1 - layer].clone())

    return seen, conditional_attention_of(model).register_forward_pre_hook(record)


def stacked(positive: list, negative: list, control, image: torch.Tensor, strength: float) -> tuple[list, list]:
    apply = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
    return apply(positive, negative, control, image, strength, 0.0, 1.0)


@pytest.mark.parametrize("order", ["stock_after_xpsr", "stock_before_xpsr"])
@torch.no_grad()
def test_conditional_attention_attends_to_xpsr_own_residuals_whatever_controlnets_are_chained(order: str):
    model, control = xpsr_model()
    stock = stock_controlnet()
    case = parity_fixture().case(CASE)
    own_residuals: list[list[torch.Tensor]] = []
    own = control.control_model.register_forward_hook(
        lambda module, args, out: own_residuals.append([r.clone() for r in out.down_residuals]))
    seen, handle = record_conditional_attention_context(model)
    try:
        alone = evaluate_once(model, *case_inputs(model, control), cfg=1.0)
        alone_seen = list(seen)
        seen.clear()
        image = case["control_image"].movedim(1, -1)
        prompts = conditioning(case["c_h"], case["c_l"])
        if order == "stock_after_xpsr":
            positive, negative = stacked(*with_control(control, prompts, prompts, case["control_image"], case.scale),
                                         stock, image, 0.8)
        else:
            positive, negative = with_control(control, *stacked(prompts, prompts, stock, image, 0.8),
                                              case["control_image"], case.scale)
        sigma = model.get_model_object("model_sampling").sigmas[case["timestep"]]
        chained = evaluate_once(model, positive, negative, case["latent"], sigma, cfg=1.0)
    finally:
        own.remove()
        handle.remove()
    layers = len(conditional_attention_of(model))
    expected = [r * case.scale for r in reversed(own_residuals[0])][:layers]
    assert len(alone_seen) == len(seen) == layers
    for layer, (a, b, e) in enumerate(zip(alone_seen, seen, expected, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"decoder layer {layer}: K/V source changed by chaining")
        torch.testing.assert_close(a, e, msg=f"decoder layer {layer}: K/V source is not XPSR's residual x strength")
    assert (chained - alone).abs().max() > 1e-3  # the stock ControlNet's residuals did reach the UNet's skips


@torch.no_grad()
def test_conditional_attention_does_nothing_while_xpsr_control_is_inactive():
    model, control = xpsr_model()
    seen, handle = record_conditional_attention_context(model)
    try:
        inactive = evaluate_once(model, *case_inputs(model, control, start_percent=0.9, end_percent=1.0), cfg=1.0)
    finally:
        handle.remove()
    plain = H.make_model()
    case = parity_fixture().case(CASE)
    prompts = conditioning(case["c_h"], case["c_l"])
    sigma = plain.get_model_object("model_sampling").sigmas[case["timestep"]]
    reference = evaluate_once(plain, prompts, prompts, case["latent"], sigma, cfg=1.0)
    assert not seen
    assert torch.equal(inactive, reference)


@torch.no_grad()
def test_tiled_upscaler_hint_equals_the_crop_of_the_bicubic_stretch():
    """TiledDiffusion and UltimateSDUpscale resize the hint through the control's fields, then crop a tile."""
    _, control = xpsr_model()
    lr = H.test_image(36, 52, seed=3)
    positive, _ = H.pack_module("nodes.apply").attach_control([[torch.zeros(1, 77, 32), {}]],
                                                              [[torch.zeros(1, 77, 32), {}]], control, lr, 1.0)
    attached = positive[0][1]["control"]
    height, width = 144, 208
    tile = (..., slice(40, 104), slice(64, 128))
    by_upscaler = comfy.utils.common_upscale(attached.cond_hint_original, width, height, attached.upscale_algorithm,
                                             "center")[tile]
    stretch = F.interpolate(lr.movedim(-1, 1), size=(height, width), mode="bicubic")
    assert torch.equal(by_upscaler, stretch[tile])
    assert torch.equal(attached.hint_at(height, width), stretch)  # the hint of the image sampled whole
    nearest = F.interpolate(lr.movedim(-1, 1), size=(height, width), mode="nearest-exact")
    assert (by_upscaler - nearest[tile]).abs().max() > 0.01


def tiled(model, max_tiles: int | None, calls: list[int]):
    """``model`` with XPSR's latent tiles (16 latent px, overlap 4) and a counter of UNet calls."""
    clone, tiler = H.with_latent_tiles(model, max_tiles)

    def count(apply_model, args):
        calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(count)
    return clone, tiler


@torch.no_grad()
def test_batched_tiles_equal_serial_tiles():
    model, control = xpsr_model()
    case = parity_fixture().case(CASE)
    latent = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    image = H.test_image(192, 320, batch=1, seed=4).movedim(-1, 1)
    prompts = conditioning(case["c_h"], case["c_l"])
    positive, negative = with_control(control, prompts, prompts, image, case.scale)
    sigma = model.get_model_object("model_sampling").sigmas[torch.tensor([500, 500])]
    results, calls = {}, {}
    for name, max_tiles in (("serial", 1), ("batched", None)):
        calls[name] = []
        tiled_model, tiler = tiled(model, max_tiles, calls[name])
        results[name] = evaluate_once(tiled_model, positive, negative, latent, sigma, cfg=4.5)
    tiles = tiler.tile_count(24, 40)
    assert tiles > 2
    assert calls["serial"] == [2 * 2] * tiles  # cond + uncond of both images, one tile per call
    assert calls["batched"] == [2 * 2 * tiles]  # every tile in one call: a CPU has the memory
    assert_parity(results["batched"], results["serial"], "batched vs serial tiles", tolerance=1e-5)


def fixture_eps(weight_dtype: str) -> torch.Tensor:
    H.setup_host()
    model, control = H.pack_module("nodes.loader").XPSRLoader.execute(H.make_model(), H.XPSR_FILE, weight_dtype).args
    return evaluate_once(model, *case_inputs(model, control), cfg=1.0)


def relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).norm() / reference.norm())


@torch.no_grad()
def test_fp8_weights_are_stored_in_fp8_and_stay_close_to_fp16():
    """fp8 (e4m3fn) XPSR weights, computed in the MODEL's fp32: the eps error against the official output, beside
    fp16's."""
    H.setup_host()
    model, control = H.pack_module("nodes.loader").XPSRLoader.execute(H.make_model(), H.XPSR_FILE, "fp8_e4m3fn").args
    stored = {p.dtype for p in control.control_model.parameters()} | {
        p.dtype for p in conditional_attention_of(model).parameters()}
    assert stored == {torch.float8_e4m3fn}
    official = parity_fixture().case(CASE)["eps"]
    eps = {dtype: fixture_eps(dtype) for dtype in ("fp32", "fp16", "bf16", "fp8_e4m3fn")}
    errors = {dtype: relative_l2(e, official) for dtype, e in eps.items()}
    fp8_vs_fp16 = relative_l2(eps["fp8_e4m3fn"], eps["fp16"])
    print(f"relative L2 error of eps against the official fp32 output: {errors}; fp8 against fp16: {fp8_vs_fp16}")
    assert errors["fp32"] < 1e-5
    assert errors["fp16"] < 2e-3 and errors["bf16"] < 2e-2
    # e4m3 keeps 3 mantissa bits (weights within about 6 %): measured 0.097 on this fixture
    assert errors["fp8_e4m3fn"] < 0.2 and fp8_vs_fp16 < 0.2


def test_fp8_weights_load_and_sample():
    prompt = H.graph(seed=41)
    prompt["2"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    executor, _ = H.run_ok(prompt)
    image = H.output(executor, "5")
    assert image.shape == (1, 148, 212, 3) and torch.isfinite(image).all()
