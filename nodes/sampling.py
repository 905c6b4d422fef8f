"""The pieces of XPSR sampling that live on ComfyUI's side: schedules, start latents, VAE, progress."""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..xpsr_core.pipeline.schedule import (
    ADDED_NOISE_LEVEL,
    START_LATENTS,
    official_timesteps_at_denoise,
    ve_start_latent,
)

OFFICIAL_SCHEDULER = "xpsr_official"
SCHEDULERS = [OFFICIAL_SCHEDULER, *comfy.samplers.KSampler.SCHEDULERS]
STARTS = (*START_LATENTS, "img2img")
VAE_TILING = ("auto", "on", "off")
ENCODE_TILE_THRESHOLD = 1088
"""Image side above which the official pipeline's VAE encoder tiles (1024 tile + 2 x 32 padding)."""
DECODE_TILE_THRESHOLD = 246
"""Latent side above which the official pipeline's VAE decoder tiles (224 tile + 2 x 11 padding)."""


def sampling_sigmas(model: comfy.model_patcher.ModelPatcher, sampler_name: str, scheduler: str, steps: int,
                    denoise: float) -> torch.Tensor:
    """ComfyUI's sigmas for its schedulers; for xpsr_official, the timesteps of the official DDPM schedule."""
    if scheduler != OFFICIAL_SCHEDULER:
        return comfy.samplers.KSampler(model, steps, model.load_device, sampler_name, scheduler, denoise,
                                       model_options=model.model_options).sigmas.cpu()
    sigmas = model.get_model_object("model_sampling").sigmas
    return torch.cat([sigmas[official_timesteps_at_denoise(steps, denoise)].cpu(), torch.zeros(1)])


def start_latent(model: comfy.model_patcher.ModelPatcher, lr_latent: torch.Tensor, sigmas: torch.Tensor, start: str,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent_image, noise) for ComfyUI's sampler, so that it starts where ``start`` asks.

    img2img: ComfyUI's usual LR latent plus noise at the first sigma (KSampler's behaviour).
    official and noise: the start of the released pipeline or pure noise, computed by the
    core in ComfyUI's sigma space and handed over with zero noise, so the sampler begins
    exactly there.
    """
    if start == "img2img":
        return lr_latent, comfy.sample.prepare_noise(lr_latent, seed)
    if start not in STARTS:
        raise ValueError(f"start is {start!r}; expected one of {STARTS}")
    latent_format = model.get_model_object("latent_format")
    added_sigma = float(model.get_model_object("model_sampling").sigmas[ADDED_NOISE_LEVEL])
    x = ve_start_latent(start, latent_format.process_in(lr_latent.float()), float(sigmas[0]), added_sigma,
                        torch.Generator().manual_seed(seed))
    return latent_format.process_out(x), torch.zeros_like(lr_latent)


def vae_encode(vae, pixels: torch.Tensor, tiling: str) -> torch.Tensor:
    """Encode (B, H, W, 3) pixels with ComfyUI's VAE, tiled when asked or when the official pipeline would."""
    if tiling == "on" or (tiling == "auto" and max(pixels.shape[1:3]) > ENCODE_TILE_THRESHOLD):
        return vae.encode_tiled(pixels)
    return vae.encode(pixels)


def vae_decode(vae, latent: torch.Tensor, tiling: str) -> torch.Tensor:
    if tiling == "on" or (tiling == "auto" and max(latent.shape[-2:]) > DECODE_TILE_THRESHOLD):
        return vae.decode_tiled(latent)
    return vae.decode(latent)


class Progress:
    """One progress bar over steps x tiles, with latent previews and interrupt checks between both."""

    def __init__(self, model: comfy.model_patcher.ModelPatcher, steps: int, tiles: int):
        self.tiles = tiles
        self.done = 0
        self.bar = comfy.utils.ProgressBar(steps * tiles)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def tile(self) -> None:
        if self.tiles > 1:
            self.done += 1
            self.bar.update_absolute(self.done)

    def step(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
        self.done = (step + 1) * self.tiles
        self.bar.update_absolute(self.done, preview=preview)
