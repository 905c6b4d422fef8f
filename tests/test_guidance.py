"""Eq. 6: which prompts fill each classifier-free guidance branch, and the paper's λ_s as ComfyUI's cfg."""

from __future__ import annotations

import pytest
import torch

from parity import ParityFixture, assert_parity
from xpsr_core import build_models, load_checkpoint
from xpsr_core.models.unet import UNet2DCondition
from xpsr_core.pipeline.guidance import LOWLEVEL_CFG_MODES, cfg_branches


def prompts() -> tuple[torch.Tensor, ...]:
    """c_h, c_l, c_neg, c_neg_l: four distinct (1, 77, 768) embeddings."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 77, 768, generator=generator) for _ in range(4))


def test_paper_mode_replaces_only_the_high_level_prompt_in_the_negative_branch():
    c_h, c_l, c_neg, c_neg_l = prompts()
    (high, low), (negative_high, negative_low) = cfg_branches(c_h, c_l, c_neg, c_neg_l, "paper")
    assert high is c_h and low is c_l
    assert negative_high is c_neg and negative_low is c_l


def test_official_mode_also_replaces_the_low_level_prompt_in_the_negative_branch():
    c_h, c_l, c_neg, c_neg_l = prompts()
    (high, low), (negative_high, negative_low) = cfg_branches(c_h, c_l, c_neg, c_neg_l, "official")
    assert high is c_h and low is c_l
    assert negative_high is c_neg and negative_low is c_neg_l


def test_branches_are_chosen_alike_for_the_texts_the_embeddings_are_encoded_from():
    texts = ("a cat, clean", "sharp", "blurry", "high resolution")
    assert cfg_branches(*texts, "paper") == (("a cat, clean", "sharp"), ("blurry", "sharp"))
    assert cfg_branches(*texts, "official") == (("a cat, clean", "sharp"), ("blurry", "high resolution"))


def test_an_unknown_mode_is_refused():
    assert LOWLEVEL_CFG_MODES == ("official", "paper")
    with pytest.raises(ValueError, match="lowlevel_cfg is 'both'; expected one of"):
        cfg_branches(*prompts(), "both")


@pytest.mark.parametrize("mode", LOWLEVEL_CFG_MODES)
@torch.no_grad()
def test_branches_reproduce_the_official_first_step_and_eq6_is_cfg_minus_one(oracle: ParityFixture, mode: str):
    """The core models with each mode's branches give the official code's two predictions at the first step of its
    CFG trajectory, and Eq. 6 with λ_s = guidance_scale - 1 gives its guided noise (diffusers' u + s (c - u))."""
    from safetensors.torch import load_file

    ckpt = load_checkpoint(oracle.checkpoint)
    controlnet, conditional = build_models(ckpt)
    unet = UNet2DCondition(ckpt.unet_config)
    weights = load_file(oracle.checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    unet.load_state_dict({k: v for k, v in weights.items() if ".pixel_attentions." not in k})
    cfg = {k[len("cfg."):]: v for k, v in oracle.tensors.items() if k.startswith("cfg.")}
    meta = oracle.meta["cfg"]
    timestep = torch.tensor(meta["timesteps"][0])
    branches = cfg_branches(cfg["c_h"], cfg["c_l"], cfg["neg_c_h"], cfg["neg_c_l"], mode)
    eps = {}
    for name, (c_h, c_l) in zip(("cond", "uncond"), branches, strict=True):
        out = controlnet(cfg["start_latent"], timestep, c_h, cfg["control_image"], c_l,
                         conditioning_scale=meta["conditioning_scale"])
        eps[name] = unet(cfg["start_latent"], timestep, c_h, out.down_residuals, out.mid_residual, conditional)
        assert_parity(eps[name], cfg[f"{mode}.eps_{name}.0"], f"{mode} eps_{name}")
    lambda_s = meta["guidance_scale"] - 1
    guided = eps["cond"] + lambda_s * (eps["cond"] - eps["uncond"])
    assert_parity(guided, cfg[f"{mode}.eps_guided.0"], f"{mode} eps_guided, Eq. 6 with lambda_s = cfg - 1")
