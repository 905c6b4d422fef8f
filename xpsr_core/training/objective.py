"""The trainable modules and the loss of one batch, as the official train.py computes it.

The HR image is encoded to a VAE posterior *sample* (scaled by 0.18215), noised to a timestep
drawn uniformly from 0..999 on SD1.5's scaled-linear schedule, and the frozen UNet with the
ControlNet's residuals and the trainable conditional attention predicts the noise. The loss is
the noise MSE plus the Degradation-Free Constraint on the ControlNet's DFC heads. Each sample's
random draws come from its own CPU generator in the official order (VAE sample, noise,
timestep), so a seeded run draws the same numbers on any device, and a sample draws the same
numbers whichever process trains it and whatever else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.conditional_attention import ConditionalAttention
from ..models.controlnet import ControlNetOutput, SFAControlNet
from ..models.unet import UNet2DCondition
from ..pipeline.schedule import TRAIN_TIMESTEPS, noise_to_level
from ..weights.sd15 import SD15Base
from .losses import DFC_WEIGHT, dfc_loss, diffusion_loss

BETA_START = 0.00085
BETA_END = 0.012


def training_alphas_cumprod(steps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """SD1.5's scaled-linear schedule in float32, as diffusers' DDPMScheduler computes it."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class XPSRTrainable(nn.Module):
    """What XPSR trains: the whole SFA-ControlNet and the UNet's conditional attention.

    ``forward`` runs the whole training prediction, so that DistributedDataParallel, which
    wraps this module and not the frozen UNet, sees every use of the trainable weights.
    """

    def __init__(self, controlnet: SFAControlNet, conditional_attention: ConditionalAttention):
        super().__init__()
        self.controlnet = controlnet
        self.conditional_attention = conditional_attention

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, c_h: torch.Tensor, control: torch.Tensor,
                c_l: torch.Tensor, unet: UNet2DCondition) -> tuple[ControlNetOutput, torch.Tensor]:
        """The ControlNet's output (residuals and DFC predictions) and the frozen UNet's noise prediction."""
        out = self.controlnet(noisy, timesteps, c_h, control, c_l, return_dfc=True)
        return out, unet(noisy, timesteps, c_h, out.down_residuals, out.mid_residual, self.conditional_attention)


@dataclass
class LossTerms:
    loss: torch.Tensor
    mse: torch.Tensor
    dfc: torch.Tensor


@dataclass(frozen=True)
class LossSettings:
    """The loss settings: DFC form and weight, and the autocast dtype (None: full fp32)."""

    dfc_form: str = "official"
    dfc_weight: float = DFC_WEIGHT
    autocast_dtype: torch.dtype | None = None


def batch_loss(trainable: nn.Module, base: SD15Base, batch: dict, generators: list[torch.Generator],
               alphas_cumprod: torch.Tensor, objective: LossSettings) -> LossTerms:
    """The loss of one batch from ``collate``, drawing from one generator per sample; ``trainable`` is an
    ``XPSRTrainable`` or its DistributedDataParallel wrapper. The frozen encoders run outside autocast, in fp32."""
    device = next(trainable.parameters()).device
    target = batch["target"].to(device)
    control = batch["control"].to(device)
    latents = base.encode_images(target, generators)
    c_h = base.encode_prompts(batch["highlevel_prompt"])
    c_l = base.encode_prompts(batch["lowlevel_prompt"])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
    timesteps = torch.cat([torch.randint(0, len(alphas_cumprod), (1,), generator=g) for g in generators])
    level = alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(device)
    timesteps = timesteps.to(device)
    noisy = noise_to_level(latents, noise, level)
    with torch.autocast(device.type, dtype=objective.autocast_dtype or torch.float32,
                        enabled=objective.autocast_dtype is not None):
        out, eps = trainable(noisy, timesteps, c_h, control, c_l, base.unet)
    mse = diffusion_loss(eps, noise)
    layers_per_block = getattr(trainable, "module", trainable).controlnet.config.layers_per_block
    dfc = dfc_loss(out, target, latents, layers_per_block, objective.dfc_form, objective.dfc_weight)
    return LossTerms(mse + dfc, mse, dfc)
