"""The frozen Stable Diffusion 1.5 base for training outside ComfyUI: UNet, VAE, CLIP text encoder, tokenizer.

XPSR trains on top of SD1.5 and never changes it. Two layouts hold SD1.5:

* a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, each with its
  config), as the official train.py reads it;
* a single ``.safetensors`` in the original LDM key layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.*``), as ComfyUI users have it.
  It holds no configs and no tokenizer: the configs default to SD1.5's (or come from a
  diffusers-style folder of ``config.json`` files), the tokenizer from a folder with
  ``vocab.json`` and ``merges.txt``.

The UNet becomes this package's ``UNet2DCondition`` (diffusers key layout), so the trained
checkpoint's ``unet/`` can be written from it; the VAE and the text encoder are diffusers'
``AutoencoderKL`` and transformers' ``CLIPTextModel``. Nothing is fetched from a hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, first_line
from ..models import sd15_configs
from ..models.config import UNetConfig, read_config_file
from ..models.unet import UNet2DCondition
from .checkpoint import WeightFile, check_tensors, find_weights_file, identify_foreign, stock_unet_shapes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
UNET_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin")
FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
TOKENIZER_HINT = ("a folder with vocab.json and merges.txt: the tokenizer/ of a diffusers SD1.5 folder, or "
                  "ComfyUI's comfy/sd1_tokenizer")


@dataclass
class SD15Base:
    """The frozen parts XPSR trains against, with the two encodings training needs."""

    unet: UNet2DCondition
    vae: Any
    text_encoder: Any
    tokenizer: Any
    source: Path

    def requires_grad_(self, enabled: bool) -> SD15Base:
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(enabled)
        return self

    def to(self, device: torch.device | str) -> SD15Base:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
        return self

    def eval(self) -> SD15Base:
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval()
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's last hidden state (clip-skip 1) of prompts cut to 77 tokens, as the official pipeline encodes them."""
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """A sample (not the mode) of the VAE posterior, scaled; ``images`` in [-1, 1].

        Each image's noise comes from its own generator on the CPU, so a seeded run draws the
        same latents on any device, and an image's latent does not depend on its batch.
        """
        if len(generators) != len(images):
            raise ValueError(f"{len(images)} images but {len(generators)} generators; expected one per image")
        dist = self.vae.encode(images).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g, dtype=dist.mean.dtype) for g in generators])
        return (dist.mean + dist.std * noise.to(dist.mean.device)) * self.vae.config.scaling_factor


def load_sd15(path: str | Path, *, configs: str | Path | None = None,
              tokenizer: str | Path | None = None) -> SD15Base:
    """Load SD1.5 from a diffusers folder or a single LDM ``.safetensors`` file.

    ``configs`` and ``tokenizer`` apply to a single file only: a folder with ``unet/``,
    ``vae/`` and ``text_encoder/`` configs (default: SD1.5's), and the tokenizer folder
    (default: ``configs/tokenizer`` when present).
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; expected an SD1.5 diffusers folder or a single-file "
                              "SD1.5 checkpoint (.safetensors)")
    return load_sd15_single_file(path, configs=configs, tokenizer=tokenizer)


def _reject_other_pipelines(folder: Path) -> None:
    index = folder / "model_index.json"
    kind = read_config_file(index).get("_class_name", "") if index.is_file() else ""
    if "XL" in kind or (folder / "text_encoder_2").is_dir():
        raise CheckpointError(f"{folder}: this is an SDXL pipeline ({kind or 'it has text_encoder_2/'}); XPSR is "
                              "built on Stable Diffusion 1.5")
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file() and read_config_file(unet_config).get("cross_attention_dim") == 1024:
        raise CheckpointError(f"{unet_config}: cross_attention_dim is 1024, a Stable Diffusion 2.x UNet; XPSR is "
                              "built on Stable Diffusion 1.5 (768)")


def load_diffusers_folder(folder: str | Path) -> SD15Base:
    """Load SD1.5 from a diffusers folder (only local files are read)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    folder = Path(folder)
    _reject_other_pipelines(folder)
    missing = [p for p in FOLDER_PARTS if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(f"{folder}: missing the subfolder(s) {', '.join(p + '/' for p in missing)}; an SD1.5 "
                              f"diffusers folder has {', '.join(p + '/' for p in FOLDER_PARTS)}")
    unet_config = UNetConfig.from_dict(read_config_file(folder / "unet" / "config.json"),
                                       str(folder / "unet" / "config.json"))
    unet = _load_unet(WeightFile(find_weights_file(folder / "unet", UNET_WEIGHT_NAMES, "UNet weights")), unet_config)
    vae = _from_pretrained(AutoencoderKL, folder / "vae", "a diffusers AutoencoderKL")
    text_encoder = _from_pretrained(CLIPTextModel, folder / "text_encoder", "a transformers CLIPTextModel")
    base = SD15Base(unet, vae, text_encoder, load_tokenizer(folder / "tokenizer"), folder)
    _check_compatible(base)
    return base


def _from_pretrained(cls: Any, folder: Path, what: str) -> Any:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; expected {what} saved with save_pretrained")
    options = {"low_cpu_mem_usage": False} if cls.__module__.startswith("diffusers") else {}
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32, **options)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{folder}: could not be loaded as {what} ({first_line(e)})") from e


def load_tokenizer(folder: str | Path) -> Any:
    """The CLIP tokenizer from a folder (vocab.json and merges.txt, or a tokenizer.json)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    has_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not folder.is_dir() or not (has_files or (folder / "tokenizer.json").is_file()):
        raise CheckpointError(f"{folder}: not a CLIP tokenizer folder; expected {TOKENIZER_HINT}")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: could not be loaded as a CLIP tokenizer ({first_line(e)})") from e


def _load_unet(weights: WeightFile, config: UNetConfig) -> UNet2DCondition:
    expected = stock_unet_shapes(config)
    check_tensors(weights.shapes, expected, weights.path, "SD1.5 UNet")
    return _unet_from_state(weights.get_many(list(expected), torch.float32), config)


def _unet_from_state(state: dict[str, torch.Tensor], config: UNetConfig) -> UNet2DCondition:
    with torch.device("meta"):
        unet = UNet2DCondition(config)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def _check_compatible(base: SD15Base) -> None:
    unet = base.unet.config
    width = base.text_encoder.config.hidden_size
    if width != unet.cross_attention_dim:
        raise CheckpointError(f"{base.source}: the text encoder's hidden size is {width} but the UNet's "
                              f"cross_attention_dim is {unet.cross_attention_dim}; expected SD1.5's CLIP ViT-L "
                              "(768) for SD1.5's UNet")
    latent = base.vae.config.latent_channels
    if latent != unet.in_channels:
        raise CheckpointError(f"{base.source}: the VAE has {latent} latent channels but the UNet takes "
                              f"{unet.in_channels}; expected SD1.5's 4-channel VAE and UNet")


def _single_file_kind(keys: set[str]) -> str | None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint (conditioner.embedders.* keys)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.* keys)"
    for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX):
        if not any(k.startswith(prefix) for k in keys):
            other = identify_foreign(keys)
            what = f"; it looks like {other}" if other and "Stable Diffusion checkpoint" not in other else ""
            return f"not a complete SD1.5 checkpoint (no {prefix}* keys{what})"
    return None


def _read_configs(configs: str | Path | None) -> tuple[dict, dict, dict, Path | None]:
    if configs is None:
        return sd15_configs.UNET, sd15_configs.VAE, sd15_configs.TEXT_ENCODER, None
    folder = Path(configs)
    raw = [read_config_file(folder / part / "config.json") for part in ("unet", "vae", "text_encoder")]
    return raw[0], raw[1], raw[2], folder


def load_sd15_single_file(path: str | Path, *, configs: str | Path | None = None,
                     tokenizer: str | Path | None = None) -> SD15Base:
    """Load SD1.5 from one ``.safetensors`` in the LDM layout, converting keys with diffusers' converters."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors single-file SD1.5 checkpoint or a diffusers folder")
    weights = WeightFile(path)
    kind = _single_file_kind(set(weights.shapes))
    if kind is not None:
        raise CheckpointError(f"{path}: this is {kind}; XPSR is built on Stable Diffusion 1.5 (keys "
                              f"{UNET_PREFIX}*, {VAE_PREFIX}*, {CLIP_PREFIX}*)")
    unet_raw, vae_raw, text_raw, config_folder = _read_configs(configs)
    tokenizer_folder = Path(tokenizer) if tokenizer else (config_folder / "tokenizer" if config_folder else None)
    if tokenizer_folder is None:
        raise CheckpointError(f"{path}: a single-file checkpoint holds no tokenizer; set the tokenizer to "
                              f"{TOKENIZER_HINT}")
    state = weights.get_many([k for k in weights.shapes if k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX))],
                             torch.float32)
    source = f"{path} (converted from the LDM layout)"

    configs_name = f"the {config_folder}" if config_folder else "the SD1.5"
    unet_config = UNetConfig.from_dict(unet_raw, f"{config_folder or 'SD1.5'} unet config")
    with _shape_hint(f"{configs_name} UNet config"):
        unet_state = convert_ldm_unet_checkpoint(state, dict(unet_raw))
        check_tensors(_shapes(unet_state), stock_unet_shapes(unet_config), source, "SD1.5 UNet")
    unet = _unet_from_state(unet_state, unet_config)

    vae = AutoencoderKL.from_config(dict(vae_raw))
    with _shape_hint(f"{configs_name} VAE config"):
        _load_checked(vae, convert_ldm_vae_checkpoint(state, dict(vae_raw)), source, "SD1.5 VAE")

    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(dict(text_raw)))
    clip_state = {_clip_key(k[len(CLIP_PREFIX):]): v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    clip_state.pop("embeddings.position_ids", None)
    own = {_clip_key(k): k for k in text_encoder.state_dict()}
    with _shape_hint(f"{configs_name} text encoder config"):
        check_tensors(_shapes(clip_state), {k: tuple(text_encoder.state_dict()[v].shape) for k, v in own.items()},
                      f"{path} ({CLIP_PREFIX}*)", "CLIP text encoder")
    text_encoder.load_state_dict({own[k]: v for k, v in clip_state.items()}, strict=True)
    text_encoder.eval()

    base = SD15Base(unet, vae.eval(), text_encoder, load_tokenizer(tokenizer_folder), path)
    _check_compatible(base)
    return base


@contextmanager
def _shape_hint(config_name: str) -> Iterator[None]:
    """Say which config a mismatching file was read with, and how to give another."""
    try:
        yield
    except (CheckpointError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{e if isinstance(e, CheckpointError) else first_line(e)}; it does not have the "
                              f"shape of {config_name} (base_configs: a folder with unet/, vae/ and text_encoder/ "
                              "config.json files for this model)") from e


def _clip_key(key: str) -> str:
    """Text-encoder keys without transformers' ``text_model.`` prefix, which differs between versions."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    check_tensors(_shapes(state), _shapes(module.state_dict()), source, what)
    module.load_state_dict(state, strict=True)
