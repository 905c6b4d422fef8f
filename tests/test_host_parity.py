"""The ComfyUI path (patched MODEL + XPSR_CONTROLNET through ComfyUI's cond batching) reproduces the official
outputs."""

from __future__ import annotations

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.conds
import comfy.sample
import comfy.samplers

from parity import ParityFixture, assert_parity, parity_fixture


def xpsr_model():
    """The Loader node's outputs on the fixture's SD1.5 MODEL."""
    H.setup_host()
    loader = H.pack_module("nodes.loader").XPSRLoader
    return loader.execute(H.make_model(), H.XPSR_FILE, "auto").args


def conditioning(c_h: torch.Tensor, c_l: torch.Tensor | None) -> list:
    extra = {} if c_l is None else {"model_conds": {"xpsr_lowlevel": comfy.conds.CONDCrossAttn(c_l)}}
    return [[c_h, extra]]


def with_control(control, positive: list, negative: list, image: torch.Tensor, strength: float) -> tuple[list, list]:
    attach = H.pack_module("nodes.apply").attach_control
    return attach(positive, negative, control, image.movedim(1, -1), strength)


def evaluate_once(model, positive, negative, z: torch.Tensor, sigma: torch.Tensor, cfg: float) -> torch.Tensor:
    """One denoiser evaluation through ComfyUI's sampler machinery at per-sample sigmas; returns eps."""
    captured = {}

    def one_evaluation(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        captured["denoised"] = model_k(x, sigma.to(x), **extra_args)
        return x

    scale = (1 + sigma ** 2).sqrt()[:, None, None, None]
    x = z * scale
    latent_format = model.get_model_object("latent_format")
    sigmas = torch.stack([sigma.max(), torch.zeros(())])
    comfy.sample.sample_custom(model, torch.zeros_like(z), cfg, comfy.samplers.KSAMPLER(one_evaluation), sigmas,
                               positive, negative, latent_format.process_out(x), disable_pbar=True, seed=0)
    return (x - captured["denoised"]) / sigma[:, None, None, None]


@pytest.fixture(scope="module")
def loaded():
    return xpsr_model()


@pytest.mark.parametrize("k", parity_fixture().case_ids)
@torch.no_grad()
def test_comfy_path_reproduces_official_eps(loaded, k: int):
    oracle = parity_fixture()
    model, control = loaded
    case = oracle.case(k)
    sigma = model.get_model_object("model_sampling").sigmas[case["timestep"]]
    positive, negative = with_control(control, conditioning(case["c_h"], case.get("c_l")),
                                      conditioning(case["c_h"], case.get("c_l")), case["control_image"], case.scale)
    eps = evaluate_once(model, positive, negative, case["latent"], sigma, cfg=1.0)
    assert_parity(eps, case["eps"], f"case {k} eps")


def trajectory(model, control, oracle: ParityFixture, variant: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The fixture's 4-step DDIM CFG run with ComfyUI's ddim sampler; latents and guided eps per step."""
    cfg = {k[len("cfg."):]: v for k, v in oracle.tensors.items() if k.startswith("cfg.")}
    meta = oracle.meta["cfg"]
    negative_low = cfg["neg_c_l"] if variant == "official" else cfg["c_l"]
    positive, negative = with_control(control, conditioning(cfg["c_h"], cfg["c_l"]),
                                      conditioning(cfg["neg_c_h"], negative_low), cfg["control_image"],
                                      meta["conditioning_scale"])
    acp = cfg["alphas_cumprod"]
    sigmas = torch.cat([((1 - acp[t]) / acp[t]).sqrt()[None] for t in cfg["timesteps"].tolist()]
                       + [((1 - acp[0]) / acp[0]).sqrt()[None]])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def callback(step, x0, x, total):
        seen.append((x.clone(), x0.clone()))

    latent_format = model.get_model_object("latent_format")
    start = cfg["start_latent"] * (1 + sigmas[0] ** 2).sqrt()
    samples = comfy.sample.sample_custom(model, torch.zeros_like(start), meta["guidance_scale"],
                                         comfy.samplers.sampler_object("ddim"), sigmas, positive, negative,
                                         latent_format.process_out(start), callback=callback, disable_pbar=True,
                                         seed=0)
    xs = [x for x, _ in seen] + [latent_format.process_in(samples)]
    latents = [xs[i + 1] / (1 + sigmas[i + 1] ** 2).sqrt() for i in range(len(sigmas) - 1)]
    guided = [(x - x0) / sigmas[i] for i, (x, x0) in enumerate(seen)]
    return latents, guided


@pytest.mark.parametrize("variant", ["official", "paper"])
@torch.no_grad()
def test_comfy_path_reproduces_official_cfg_trajectory(loaded, variant: str):
    oracle = parity_fixture()
    model, control = loaded
    latents, guided = trajectory(model, control, oracle, variant)
    assert len(latents) == 4
    for i, (z, g) in enumerate(zip(latents, guided, strict=True)):
        assert_parity(g, oracle.tensors[f"cfg.{variant}.eps_guided.{i}"], f"{variant} guided eps, step {i}")
        assert_parity(z, oracle.tensors[f"cfg.{variant}.latents.{i}"], f"{variant} latent after step {i}")


@torch.no_grad()
def test_cond_and_uncond_batched_together_or_apart_agree(loaded, monkeypatch):
    oracle = parity_fixture()
    model, control = loaded
    batches: list[list[int]] = []
    original_concat = comfy.samplers.can_concat_cond

    def apply_model_recorder(apply_model, args):
        batches.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    recording = model.clone()
    recording.set_model_unet_function_wrapper(apply_model_recorder)
    together, _ = trajectory(recording, control, oracle, "official")
    assert batches and all(sorted(b) == [0, 1] for b in batches)

    batches.clear()
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", lambda c1, c2: c1 is c2)
    apart, _ = trajectory(recording, control, oracle, "official")
    monkeypatch.setattr(comfy.samplers, "can_concat_cond", original_concat)
    assert batches and all(len(b) == 1 for b in batches)
    for i, (a, b) in enumerate(zip(together, apart, strict=True)):
        assert_parity(a, b, f"latent after step {i}, cond and uncond batched together vs apart", tolerance=1e-5)
