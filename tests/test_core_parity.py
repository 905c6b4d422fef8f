"""The core reproduces the official XPSR forward passes, loaded from either checkpoint layout."""

from __future__ import annotations

import pytest
import torch

from parity import ParityFixture, assert_parity
from xpsr_core import build_models, convert_official, load_checkpoint
from xpsr_core.models.unet import UNet2DCondition
from xpsr_core.weights.checkpoint import load_official

LAYOUTS = ["official_folder", "single_file"]


@pytest.fixture(scope="module", params=LAYOUTS)
def models(request, oracle: ParityFixture, tmp_path_factory):
    if request.param == "official_folder":
        ckpt = load_checkpoint(oracle.checkpoint)
    else:
        path = tmp_path_factory.mktemp("converted") / "xpsr.safetensors"
        convert_official(oracle.checkpoint, path)
        ckpt = load_checkpoint(path)
    return build_models(ckpt)


@pytest.fixture(scope="module")
def base_unet(oracle: ParityFixture) -> UNet2DCondition:
    """The stock part of the fixture's UNet, loaded outside the XPSR loader (as ComfyUI would hold it)."""
    from safetensors.torch import load_file

    official = load_official(oracle.checkpoint)
    unet = UNet2DCondition(official.unet_config)
    weights = load_file(oracle.checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    unet.load_state_dict({k: v for k, v in weights.items() if ".pixel_attentions." not in k})
    return unet


def _case_ids():
    from parity import parity_fixture

    return parity_fixture().case_ids


@pytest.mark.parametrize("k", _case_ids())
@torch.no_grad()
def test_controlnet_reproduces_every_official_output(models, oracle: ParityFixture, k: int):
    controlnet, _ = models
    case = oracle.case(k)
    out = controlnet(case["latent"], case["timestep"], case["c_h"], case["control_image"], case.get("c_l"),
                     conditioning_scale=case.scale, return_dfc=True)
    down = case.names("cn_down")
    assert len(out.down_residuals) == len(down)
    for i, name in enumerate(down):
        assert_parity(out.down_residuals[i], case[name], name)
    assert_parity(out.mid_residual, case["cn_mid"], "cn_mid")
    for i, name in enumerate(case.names("dfc_rgb")):
        assert_parity(out.dfc_rgb[i], case[name], name)
    for i, name in enumerate(case.names("dfc_latent")):
        assert_parity(out.dfc_latent[i], case[name], name)
    assert_parity(out.dfc_latent_mid, case["dfc_latent_mid"], "dfc_latent_mid")


@pytest.mark.parametrize("k", _case_ids())
@torch.no_grad()
def test_unet_with_conditional_attention_reproduces_official_eps(models, base_unet, oracle: ParityFixture, k: int):
    _, conditional = models
    case = oracle.case(k)
    residuals = [case[n] for n in case.names("cn_down")]
    eps = base_unet(case["latent"], case["timestep"], case["c_h"], residuals, case["cn_mid"], conditional)
    assert_parity(eps, case["eps"], "eps")


@torch.no_grad()
def test_conditional_attention_is_not_optional_for_parity(models, base_unet, oracle: ParityFixture):
    """Guards the test above: without XPSR's attention, the stock UNet misses the reference."""
    case = oracle.case(oracle.case_ids[0])
    residuals = [case[n] for n in case.names("cn_down")]
    eps = base_unet(case["latent"], case["timestep"], case["c_h"], residuals, case["cn_mid"])
    with pytest.raises(AssertionError):
        assert_parity(eps, case["eps"], "eps")
