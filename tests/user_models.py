"""The model files a user has under ComfyUI/models, written for tests that drive ComfyUI as a user does.

- ``checkpoints/xpsr_test_sd15.safetensors``: a single-file SD1.5 checkpoint (the original LDM
  keys) that ComfyUI's Load Checkpoint detects as SD1.5. Detection reads SD1.5's widths: a
  320-channel UNet with a 768-wide context, CLIP-L (full size, 12 layers) and SD's VAE (full
  size). The UNet is shallower than SD1.5's (one resnet per level, 320 channels at every level),
  so a CPU samples it in seconds.
- ``xpsr/xpsr_test.safetensors``: the pack's single file, written by
  ``python -m xpsr_core.weights.convert`` from an official-layout folder (``controlnet/``,
  ``unet/`` with the same UNet's stock tensors and the conditional attention) of these shapes;
  ``xpsr/xpsr_test_other.safetensors`` a second one (other random weights), as a user who
  compares two trainings has.
- ``LLM/llava-hf/llava-tiny``: a tiny random captioner (tests/tiny_vlm.py).

And the photos a user restores with them (``write_lr_photo``), and the shipped API workflows pointed at these
files (``api_workflow``).

Random, seeded weights: the same files come out every time. Building needs ComfyUI's classes
(comfy_host imports them) and takes about half a minute on a CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import comfy_host as H

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
from comfy.ldm.models.autoencoder import AutoencoderKL

import tiny_vlm
from xpsr_core.models.conditional_attention import ConditionalAttention
from xpsr_core.models.config import UNetConfig
from xpsr_core.models.controlnet import SFAControlNet
from xpsr_core.models.sd15_configs import UNET as SD15_UNET
from xpsr_core.models.unet import UNet2DCondition
from xpsr_core.training.checkpoints import WEIGHTS_NAME, official_controlnet_config, official_unet_config
from xpsr_core.training.from_unet import controlnet_config_from_unet

UNET = SD15_UNET | {"block_out_channels": [320, 320, 320, 320], "layers_per_block": 1}
"""SD1.5's UNet config, shallower: what ComfyUI's detection reads (320 channels, 768 context) is SD1.5's."""
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
CHECKPOINT = "xpsr_test_sd15.safetensors"
XPSR = "xpsr_test.safetensors"
XPSR_OTHER = "xpsr_test_other.safetensors"
LLM = "llava-hf/llava-tiny"


LR_SIDE = 32
PHOTOS = ("astronaut", "coffee", "chelsea")
"""Colour photos that ship with scikit-image."""


def write_lr_photo(path: Path, side: int = LR_SIDE, photo: str = "astronaut") -> Path:
    """A user's low-resolution photo: one of scikit-image's ``PHOTOS``, ``side`` px square, as PNG."""
    from PIL import Image
    from skimage import data

    Image.fromarray(getattr(data, photo)()).resize((side, side), Image.BICUBIC).save(path)
    return path


@dataclass(frozen=True)
class UserModels:
    """Where the files are: ``models`` is the models folder, the names are as ComfyUI's loaders list them."""

    models: Path
    checkpoint: str = CHECKPOINT
    xpsr: str = XPSR
    xpsr_other: str = XPSR_OTHER
    llm: str = LLM


def api_workflow(name: str, image: str, models: UserModels, xpsr: str | None = None, **sampler) -> dict:
    """A shipped API workflow (workflows/api), its loaders pointed at the user's files (``xpsr``: another XPSR file
    than ``models.xpsr``) and Load Image at ``image``; XPSR Sampler's ``sampler`` settings on top of a CPU-sized
    run (3 steps, x2 at process size 64), XPSR Caption at 4 new tokens."""
    prompt = json.loads((H.REPO / "workflows" / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        match node["class_type"]:
            case "CheckpointLoaderSimple":
                inputs["ckpt_name"] = models.checkpoint
            case "XPSRLoader":
                inputs["xpsr_model"] = xpsr or models.xpsr
            case "XPSRMLLMLoader":
                inputs |= {"model": models.llm, "dtype": "fp32"}
            case "XPSRCaption":
                inputs["max_new_tokens"] = 4
            case "LoadImage":
                inputs["image"] = image
            case "XPSRSampler":
                inputs |= {"steps": 3, "process_size": 64, "scale": 2.0} | sampler
    return prompt


def sd15_checkpoint(unet: UNet2DCondition) -> dict[str, torch.Tensor]:
    """``unet`` with a random CLIP-L and SD VAE (ComfyUI's classes), under the keys of an original SD1.5 file."""
    key_map = comfy.utils.unet_to_diffusers(H.comfy_unet_config(unet.config))
    unet_state = unet.state_dict()
    state = {f"model.diffusion_model.{comfy_key}": unet_state[key] for key, comfy_key in key_map.items()
             if key in unet_state}
    assert len(state) == len(unet_state), "every UNet tensor has an LDM key"
    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                comfy.sd1_clip.SD1ClipModel))
    state |= {f"cond_stage_model.{k.removeprefix('clip_l.')}": v
              for k, v in H._random_init(clip.cond_stage_model, seed=11).state_dict().items()}
    vae = H._random_init(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4), seed=12)
    state |= {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    return state


def write_official_folder(folder: Path, unet: UNet2DCondition, seed: int) -> None:
    """An XPSR checkpoint folder as the official train.py writes it, for ``unet``: random ControlNet and conditional
    attention (torch's default initialisation, from ``seed``)."""
    torch.manual_seed(seed)
    controlnet = SFAControlNet(controlnet_config_from_unet(unet.config))
    attention = ConditionalAttention(unet.config)
    for name, config, state in (
            ("controlnet", official_controlnet_config(controlnet.config), controlnet.state_dict()),
            ("unet", official_unet_config(unet.config), {**unet.state_dict(), **attention.state_dict()})):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name / WEIGHTS_NAME))


def write_user_models(models: Path) -> UserModels:
    """The model files under ``models`` (checkpoints/, xpsr/, LLM/), fp16 where a user's are."""
    torch.manual_seed(10)
    unet = UNet2DCondition(UNetConfig.from_dict(UNET))
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd15_checkpoint(unet).items()},
              str(models / "checkpoints" / CHECKPOINT))
    (models / "xpsr").mkdir(exist_ok=True)
    for name, seed in ((XPSR, 13), (XPSR_OTHER, 14)):
        official = models.parent / f"official_{Path(name).stem}"
        write_official_folder(official, unet, seed)
        subprocess.run([sys.executable, "-m", "xpsr_core.weights.convert", str(official), str(models / "xpsr" / name),
                        "--dtype", "fp16"], check=True, cwd=H.REPO, capture_output=True)
        shutil.rmtree(official)
    tiny_vlm.build_llava(models / "LLM" / LLM)
    return UserModels(models)
