"""The official inference schedule and start latent, and their place in ComfyUI's sigma space.

The released test script samples with diffusers' DDPMScheduler built from SD1.5's config:
scaled-linear betas, "leading" timestep spacing with offset 1 (951, 901, ..., 1 for 20 steps),
fixed-small variance, no clipping. It starts from the encoded LR latent noised to the first
timestep and then noised again to level 800, which leaves about 1.7 % of LR signal.

The official pipeline keeps its latents variance-preserving (VP): x_t = sqrt(ᾱ_t) x_0 +
sqrt(1 - ᾱ_t) ε, with noise levels given as alphas_cumprod ᾱ. ComfyUI's samplers keep them
variance-exploding (VE): x = x_0 + σ ε, with noise levels given as sigmas, and an
epsilon-prediction model's σ is sqrt((1 - ᾱ) / ᾱ). The functions below convert between the two.
"""

from __future__ import annotations

import torch

TRAIN_TIMESTEPS = 1000
ADDED_NOISE_LEVEL = 800
START_LATENTS = ("official", "noise")
"""The starts computed here: the released pipeline's (the LR latent noised twice) and pure noise."""


def official_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """Leading spacing with steps_offset 1, as diffusers computes it for SD1.5."""
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps is {steps}; expected 1 to {train_timesteps}")
    ratio = train_timesteps // steps
    return [i * ratio + 1 for i in reversed(range(steps))]


def official_timesteps_at_denoise(steps: int, denoise: float) -> list[int]:
    """The xpsr_official scheduler's timesteps for ``steps`` steps at ``denoise`` (< 1 runs the end of the schedule).

    ComfyUI's KSampler rule for its own schedulers: a schedule of int(steps / denoise) steps
    of which the last ``steps`` run, so a partial run takes the same step size near the end
    and still finishes at timestep 1.
    """
    total = steps if denoise > 0.9999 else int(steps / denoise)
    return official_timesteps(total)[-steps:]


def alpha_cumprod_at(sigma: float) -> float:
    """ᾱ of the noise level that ComfyUI calls ``sigma``: σ² = (1 - ᾱ) / ᾱ, so ᾱ = 1 / (1 + σ²).

    ComfyUI's model sampling stores only sigmas, so this is how the official start's
    alphas_cumprod are read from it.
    """
    return 1 / (1 + sigma ** 2)


def vp_to_ve(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """A VP latent at noise level ``sigma`` as the VE latent ComfyUI's samplers take: scaled by sqrt(1 + σ²).

    sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε divided by sqrt(ᾱ) is x_0 + σ ε; ComfyUI's
    ``calculate_input`` divides by the same factor before each model call, so the model sees
    the official x_t.
    """
    return z * (1 + sigma ** 2) ** 0.5


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


def ve_start_latent(start: str, lr_latent: torch.Tensor, sigma: float, added_sigma: float,
                    generator: torch.Generator) -> torch.Tensor:
    """The latent (B, 4, h, w) a ComfyUI sampler whose first sigma is ``sigma`` starts from, in its VE space.

    official: ``official_start`` of the scaled LR latent ``lr_latent``, noised to the first
    sigma and then to ``added_sigma`` (ComfyUI's sigma of timestep ADDED_NOISE_LEVEL); noise:
    pure Gaussian noise, as the official pipeline's init_latent_with_noise, for which
    ``lr_latent`` gives only the shape. Both draw from ``generator``, in the official order.
    """
    if start not in START_LATENTS:
        raise ValueError(f"start is {start!r}; expected one of {START_LATENTS}")
    if start == "official":
        z = official_start(lr_latent, alpha_cumprod_at(sigma), alpha_cumprod_at(added_sigma), generator)
    else:
        z = torch.randn(lr_latent.shape, generator=generator)
    return vp_to_ve(z, sigma)
