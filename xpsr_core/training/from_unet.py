"""The official initialisation of XPSR's trainable parts from the SD1.5 UNet (``ControlNetModel.from_unet``).

Training starts the SFA-ControlNet as a copy of the UNet's encoder, so at step 0 every
branch computes what SD1.5 computes and the zero convolutions keep the UNet's output
unchanged. The rules, as the official train.py applies them:

* conv_in, time_embedding, the down blocks (resnets, text attentions, downsamplers) and the
  mid block are copied from the UNet;
* both semantic-fusion branches (``attentions_lowlevel``, ``attentions_connect``) are
  copied from the text attentions, except the connect attentions' ``attn2.to_k`` /
  ``attn2.to_v``, whose context is a C-channel feature instead of text and which therefore
  keep their fresh random initialisation;
* the zero convs (``controlnet_down_blocks``, ``controlnet_mid_block``) and the
  conditioning embedding's ``conv_out`` start at zero;
* the DFC heads (``to_rgbs``, ``conv_degradation*``), the rest of the conditioning
  embedding and the UNet's conditional attention keep torch's default initialisation
  (diffusers' default; the conditional attention is not zero-initialised).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from ..errors import CheckpointError
from ..models.config import ControlNetConfig, UNetConfig, UNetShape
from ..models.controlnet import SFAControlNet
from ..models.unet import UNet2DCondition

COPIED_PREFIXES = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
ZERO_PREFIXES = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
_BRANCHES = (".attentions_lowlevel.", ".attentions_connect.")


def controlnet_config_from_unet(config: UNetConfig, fusion: str = "parallel") -> ControlNetConfig:
    """The ControlNet config ``from_unet`` derives: the UNet's encoder shape and the official flags."""
    return ControlNetConfig(**{f.name: getattr(config, f.name) for f in fields(UNetShape)}, fusion=fusion)


def unet_source_key(controlnet_key: str) -> str | None:
    """The UNet tensor a ControlNet tensor is copied from, or None when it keeps its own initialisation."""
    if not controlnet_key.startswith(COPIED_PREFIXES):
        return None
    if ".attentions_connect." in controlnet_key and (".attn2.to_k." in controlnet_key
                                                     or ".attn2.to_v." in controlnet_key):
        return None
    for branch in _BRANCHES:
        controlnet_key = controlnet_key.replace(branch, ".attentions.")
    return controlnet_key


def controlnet_from_unet(unet: UNet2DCondition, fusion: str = "parallel") -> SFAControlNet:
    """A new SFA-ControlNet initialised from ``unet`` by the official rules.

    Fresh tensors are drawn from torch's global generator; seed it first for a reproducible start.
    """
    controlnet = SFAControlNet(controlnet_config_from_unet(unet.config, fusion))
    source = unet.state_dict()
    with torch.no_grad():
        for key, tensor in controlnet.state_dict().items():
            src = unet_source_key(key)
            if src is not None:
                if src not in source or source[src].shape != tensor.shape:
                    found = list(source[src].shape) if src in source else "nothing"
                    raise CheckpointError(f"ControlNet tensor '{key}' is copied from the UNet's '{src}' (shape "
                                          f"{list(tensor.shape)}); the UNet has {found} there")
                tensor.copy_(source[src])
            elif key.startswith(ZERO_PREFIXES):
                tensor.zero_()
    return controlnet

