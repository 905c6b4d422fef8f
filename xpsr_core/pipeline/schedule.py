"""The official inference schedule and start latent.

The released test script samples with diffusers' DDPMScheduler built from SD1.5's config:
scaled-linear betas, "leading" timestep spacing with offset 1 (951, 901, ..., 1 for 20 steps),
fixed-small variance, no clipping. It starts from the encoded LR latent noised to the first
timestep and then noised again to level 800, which leaves about 1.7 % of LR signal.
"""

from __future__ import annotations

import torch

TRAIN_TIMESTEPS = 1000
ADDED_NOISE_LEVEL = 800


def official_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """Leading spacing with steps_offset 1, as diffusers computes it for SD1.5."""
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps is {steps}; expected 1 to {train_timesteps}")
    ratio = train_timesteps // steps
    return [i * ratio + 1 for i in reversed(range(steps))]


def noise_to_level(z: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor | float) -> torch.Tensor:
    """``add_noise``: sqrt(a) z + sqrt(1 - a) noise, in the variance-preserving latent space."""
    a = torch.as_tensor(alpha_cumprod, dtype=z.dtype, device=z.device)
    return a.sqrt() * z + (1 - a).sqrt() * noise


def official_start(lr_latent: torch.Tensor, first_alpha_cumprod: float, added_alpha_cumprod: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The official start: the LR latent noised to the first timestep, then again to level 800.

    Returns the variance-preserving latent the first sampling step takes as x_t.
    """
    first = torch.randn(lr_latent.shape, generator=generator, dtype=lr_latent.dtype).to(lr_latent.device)
    added = torch.randn(lr_latent.shape, generator=generator, dtype=lr_latent.dtype).to(lr_latent.device)
    return noise_to_level(noise_to_level(lr_latent, first, first_alpha_cumprod), added, added_alpha_cumprod)
