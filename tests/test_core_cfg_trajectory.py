"""Multi-step classifier-free guidance with the core models follows the official trajectories.

The DDIM update here is the fixture's reference sampler, written out as its README states
it; it is the oracle's procedure, not a sampler of the pack.
"""

from __future__ import annotations

import pytest
import torch

from parity import ParityFixture, assert_parity
from xpsr_core import build_models, load_checkpoint
from xpsr_core.models.unet import UNet2DCondition


@pytest.fixture(scope="module")
def pipeline(oracle: ParityFixture):
    from safetensors.torch import load_file

    ckpt = load_checkpoint(oracle.checkpoint)
    controlnet, conditional = build_models(ckpt)
    unet = UNet2DCondition(ckpt.unet_config)
    weights = load_file(oracle.checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    unet.load_state_dict({k: v for k, v in weights.items() if ".pixel_attentions." not in k})
    return controlnet, conditional, unet


@pytest.mark.parametrize("variant", ["official", "paper"])
@torch.no_grad()
def test_cfg_trajectory_matches_official(pipeline, oracle: ParityFixture, variant: str):
    controlnet, conditional, unet = pipeline
    cfg = {k[len("cfg."):]: v for k, v in oracle.tensors.items() if k.startswith("cfg.")}
    meta = oracle.meta["cfg"]
    acp = cfg["alphas_cumprod"]
    timesteps = cfg["timesteps"].tolist()
    step = 1000 // len(timesteps)
    z = cfg["start_latent"]
    enc = torch.cat([cfg["neg_c_h"], cfg["c_h"]])
    low = torch.cat([cfg["neg_c_l"] if variant == "official" else cfg["c_l"], cfg["c_l"]])
    image = torch.cat([cfg["control_image"]] * 2)
    for i, t in enumerate(timesteps):
        zin = torch.cat([z, z])
        out = controlnet(zin, torch.tensor(t), enc, image, low, conditioning_scale=meta["conditioning_scale"])
        eps = unet(zin, torch.tensor(t), enc, out.down_residuals, out.mid_residual, conditional)
        eu, ec = eps.chunk(2)
        g = eu + meta["guidance_scale"] * (ec - eu)
        assert_parity(eu, cfg[f"{variant}.eps_uncond.{i}"], f"{variant} eps_uncond step {i}")
        assert_parity(ec, cfg[f"{variant}.eps_cond.{i}"], f"{variant} eps_cond step {i}")
        a_t = acp[t]
        a_prev = acp[t - step] if t - step >= 0 else acp[0]
        x0 = (z - (1 - a_t).sqrt() * g) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * g
        assert_parity(z, cfg[f"{variant}.latents.{i}"], f"{variant} latent after step {i}")
