"""XPSR Sampler: LR image in, restored image of exactly LR size x scale out, with ComfyUI's samplers."""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..xpsr_core.pipeline.color import COLOR_FIX_CHOICES
from ..xpsr_core.pipeline.color import color_fix as apply_color_fix
from ..xpsr_core.pipeline.image import pipeline_bytes, resize, to_rgb, upscale_for_processing
from ..xpsr_core.pipeline.tiling import processing_tile_grid
from .apply import attach_control
from .common import CATEGORY, XPSRControlNetType
from .sampling import (
    OFFICIAL_SCHEDULER,
    SCHEDULERS,
    STARTS,
    VAE_TILING,
    Progress,
    sampling_sigmas,
    start_latent,
    vae_decode,
    vae_encode,
)
from .tile_grid import check_tile_settings, process_size_input, scale_input, tile_overlap_input, tile_size_input
from .tile_prompts import check_tile_prompts
from .tiled_sampling import TiledCondBatch

TILES_KEY = "xpsr_latent_tiles"


MIN_LR_SIDE = 8


def check_image(image: torch.Tensor) -> torch.Tensor:
    """The LR image as (B, 3, H, W) float, refusing what cannot be restored."""
    rgb = to_rgb(image)
    if min(rgb.shape[1:3]) < MIN_LR_SIDE:
        raise ValueError(f"image is {rgb.shape[2]}x{rgb.shape[1]} px; expected at least {MIN_LR_SIDE} px per side")
    if not torch.isfinite(rgb).all():
        raise ValueError("image contains NaN or Inf values; expected finite pixel values in [0, 1]")
    return rgb.movedim(-1, 1).float()


def check_prompts(batch: int, **conditionings: list) -> None:
    """One prompt for every image, or one per image: anything else would silently pair the wrong prompts."""
    for name, conditioning in conditionings.items():
        for cond, _ in conditioning:
            if cond.shape[0] not in (1, batch):
                raise ValueError(f"{name} conditioning holds {cond.shape[0]} prompts but the image batch has {batch} "
                                 "images; expected one prompt for all or one per image")


def check_memory(batch: int, height: int, width: int, scale: float, process_size: int) -> None:
    """Refuse, before any work, an output whose images cannot fit in memory."""
    needed = pipeline_bytes(batch, height, width, scale, process_size)
    free = comfy.model_management.get_free_memory(comfy.model_management.intermediate_device())
    if needed > free:
        raise ValueError(f"an output of {int(width * scale)}x{int(height * scale)} px x {batch} needs about "
                         f"{needed / 2**30:.1f} GiB for its images and {free / 2**30:.1f} GiB are free; lower the "
                         "scale or the batch")


class XPSRSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRSampler",
            display_name="XPSR Sampler",
            category=CATEGORY,
            description="Restores and upscales an LR image with XPSR: official resize rules, VAE encode, sampling "
                        "with ComfyUI's samplers (large images in overlapping latent tiles), VAE decode, colour fix, "
                        "and a result of exactly LR size x scale. Defaults reproduce the official test script.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from XPSR Loader."),
                XPSRControlNetType.Input("xpsr_controlnet", tooltip="From XPSR Loader."),
                io.Conditioning.Input("positive", tooltip="From XPSR Dual Prompt Encode."),
                io.Conditioning.Input("negative", tooltip="From XPSR Dual Prompt Encode."),
                io.Image.Input("image", tooltip="The low-resolution image (batches, any size; alpha is dropped, "
                                                "grayscale expanded)."),
                io.Vae.Input("vae", tooltip="SD1.5's VAE."),
                scale_input(),
                process_size_input(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the start noise and of stochastic samplers."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps (official 20, paper 50)."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance, u + cfg (c - u) (official 4.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddpm",
                               tooltip="ComfyUI's samplers; ddpm with the xpsr_official scheduler is the official "
                                       "DDPM sampling."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default=OFFICIAL_SCHEDULER,
                               tooltip="xpsr_official: the released DDPM schedule (leading spacing, 951...1 for 20 "
                                       "steps); or ComfyUI's schedulers."),
                io.Combo.Input("start", options=list(STARTS), default="official",
                               tooltip="official: LR latent noised at the first timestep and again at level 800 "
                                       "(released pipeline). noise: pure noise. img2img: ComfyUI's LR latent + noise "
                                       "with denoise, as KSampler does."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="img2img start only: the part of the schedule that is run."),
                io.Float.Input("control_strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="ControlNet conditioning scale (official 1.0)."),
                tile_size_input(),
                tile_overlap_input(),
                io.Combo.Input("vae_tiling", options=list(VAE_TILING), default="auto",
                               tooltip="ComfyUI's tiled VAE encode/decode; auto tiles where the official pipeline "
                                       "does (images above 1088 px to encode, above ~1968 px to decode)."),
                io.Combo.Input("color_fix", options=list(COLOR_FIX_CHOICES), default="adain",
                               tooltip="Restore the LR image's colours: adain (official), wavelet, or none."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The restored image, exactly LR size x scale."),
                io.Latent.Output(display_name="latent",
                                 tooltip="The sampled latent at the processing size, e.g. for Save Latent."),
            ],
        )

    @classmethod
    def execute(cls, model, xpsr_controlnet, positive, negative, image, vae, scale: float, process_size: int,
                seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, start: str, denoise: float,
                control_strength: float, tile_size: int, tile_overlap: int, vae_tiling: str,
                color_fix: str) -> io.NodeOutput:
        check_tile_settings(tile_size, tile_overlap)
        lr = check_image(image)
        check_prompts(lr.shape[0], positive=positive, negative=negative)
        check_memory(lr.shape[0], lr.shape[-2], lr.shape[-1], scale, process_size)
        check_tile_prompts(processing_tile_grid(lr.shape[-2], lr.shape[-1], scale, process_size, tile_size,
                                                tile_overlap, lr.shape[0]), positive=positive, negative=negative)
        upscaled = upscale_for_processing(lr, scale, process_size)
        lr_latent = vae_encode(vae, upscaled.movedim(1, -1), vae_tiling)
        positive, negative = attach_control(positive, negative, xpsr_controlnet, upscaled.movedim(1, -1),
                                            control_strength)

        sampling_model = model.clone()
        tiler = TiledCondBatch(tile_size, tile_overlap)
        progress = Progress(sampling_model, steps, tiler.tile_count(*lr_latent.shape[-2:]))
        tiler.on_tile = progress.tile
        sampling_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, TILES_KEY, tiler)

        lr_latent = comfy.sample.fix_empty_latent_channels(sampling_model, lr_latent)
        sigmas = sampling_sigmas(sampling_model, sampler_name, scheduler, steps,
                                 denoise if start == "img2img" else 1.0)
        latent_image, noise = start_latent(sampling_model, lr_latent, sigmas, start, seed)
        samples = comfy.sample.sample_custom(
            sampling_model, noise, cfg, comfy.samplers.sampler_object(sampler_name), sigmas, positive, negative,
            latent_image, callback=progress.step, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)

        restored = vae_decode(vae, samples, vae_tiling).movedim(-1, 1).float()
        restored = apply_color_fix(restored, upscaled.to(restored.device), color_fix)
        out = resize(restored, int(lr.shape[-2] * scale), int(lr.shape[-1] * scale))
        return io.NodeOutput(out.movedim(1, -1), {"samples": samples})
