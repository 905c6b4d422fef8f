"""A tiny SD1.5-shaped base and a tiny paired training set, built offline for the training tests.

The UNet is the parity fixture's stock UNet (its config and weights without the pixel
attentions), so a checkpoint trained on this base fits the ComfyUI host's fixture MODEL. The
VAE is a diffusers AutoencoderKL with 32-channel blocks and SD1.5's x8 downscale, the text
encoder a 2-layer CLIPTextModel of width 32, the tokenizer a CLIPTokenizer over the 256
byte-level symbols, their end-of-word forms and a few merges. The base is written both as a
diffusers folder and as an LDM single file; the LDM keys are produced here by inverting
the diffusers key layout, and ``xpsr_core.weights.sd15`` converts them back with diffusers' own
converters, so the two loaders agreeing tests both directions.

The training set is crops of photos that ship with scikit-image, degraded by a x4
bicubic down- and up-sampling, with hand-written captions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from parity import parity_fixture

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
    "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 64,
    "scaling_factor": 0.18215,
}
MERGES = [("t", "h"), ("th", "e</w>"), ("i", "n</w>"), ("o", "n</w>"), ("a", "n</w>"), ("e", "r</w>")]


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes (GPT-2 / CLIP ``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tokenizer(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES] + ["<|startoftext|>",
                                                                                      "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return vocab


def text_config(vocab: dict[str, int]) -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "max_position_embeddings": 77, "vocab_size": len(vocab), "hidden_act": "quick_gelu",
            "projection_dim": 32, "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}


def fixture_unet() -> tuple[dict, dict[str, torch.Tensor]]:
    """The fixture UNet's config as an SD1.5 diffusers config (no XPSR keys) and its stock weights."""
    checkpoint = parity_fixture().checkpoint / "unet"
    config = json.loads((checkpoint / "config.json").read_text())
    for key in ("up_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "down_use_lowlevel_prompt"):
        config.pop(key)
    weights = load_file(checkpoint / "diffusion_pytorch_model.safetensors")
    return config, {k: v for k, v in weights.items() if ".pixel_attentions." not in k}


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet keys to the original ``model.diffusion_model.*`` layout."""
    per_down = config["layers_per_block"] + 1
    with_attention = {b for b, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        name = ".".join(parts[-1:])
        head = ".".join(parts[:-1])
        if head in _UNET_TOP:
            ldm = f"{_UNET_TOP[head]}.{name}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, kind = int(parts[1]), parts[2]
            down = parts[0] == "down_blocks"
            if kind in ("downsamplers", "upsamplers"):
                if down:
                    ldm = f"input_blocks.{(b + 1) * per_down}.0.op.{name}"
                else:
                    ldm = f"output_blocks.{b * per_down + per_down - 1}.{2 if b in with_attention else 1}.conv.{name}"
            else:
                j, rest = int(parts[3]), parts[4:]
                index = 1 + b * per_down + j if down else b * per_down + j
                block = "input_blocks" if down else "output_blocks"
                sub = 0 if kind == "resnets" else 1
                if kind == "resnets":
                    rest = [_RESNET_TO_LDM.get(rest[0], rest[0])] + rest[1:]
                ldm = f"{block}.{index}.{sub}." + ".".join(rest)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            index = 1 if kind == "attentions" else 2 * j
            if kind == "resnets":
                rest = [_RESNET_TO_LDM.get(rest[0], rest[0])] + rest[1:]
            ldm = f"middle_block.{index}." + ".".join(rest)
        else:
            raise KeyError(key)
        out["model.diffusion_model." + ldm] = tensor
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys to the original ``first_stage_model.*`` layout."""
    out = {}
    for key, tensor in state.items():
        ldm = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(blocks):
            ldm = ldm.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            ldm = ldm.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            ldm = ldm.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            ldm = ldm.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        for j in (0, 1):
            ldm = ldm.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
        if "mid_block.attentions.0." in ldm:
            ldm = ldm.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in _VAE_ATTENTION.items():
                ldm = ldm.replace(f"attn_1.{new}.", f"attn_1.{old}.")
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + ldm] = tensor
    return out


@dataclass
class TinyBase:
    folder: Path
    single_file: Path

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer"


def build_tiny_base(root: Path, seed: int = 0) -> TinyBase:
    """Write the tiny base as a diffusers folder and as an LDM single file under ``root``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = root / "tiny-sd15"
    torch.manual_seed(seed)
    unet_config, unet_state = fixture_unet()
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
    save_file(unet_state, folder / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    vae = AutoencoderKL.from_config(VAE_CONFIG)
    vae.save_pretrained(folder / "vae")
    vocab = write_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(vocab)))
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    clip_state = {k[len("text_model."):] if k.startswith("text_model.") else k: v
                  for k, v in text_encoder.state_dict().items()}
    ldm = {**unet_to_ldm(unet_state, unet_config), **vae_to_ldm(vae.state_dict(), 4),
           **{f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip_state.items()}}
    single = root / "tiny-sd15.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, single)
    return TinyBase(folder, single)


PHOTOS = {
    "astronaut": ("an astronaut in a white suit in front of a flag", "slightly blurry, some noise, fair quality"),
    "coffee": ("a cup of coffee on a saucer", "blurry with soft edges, low quality"),
    "chelsea": ("a tabby cat looking to the side", "noisy and blurred, poor clarity"),
    "rocket": ("a rocket on a launch pad", "very blurry, colours washed out"),
}


def photo(name: str, size: int) -> Image.Image:
    """A centre square of one of scikit-image's bundled photos, resized to ``size``."""
    import skimage.data

    array = getattr(skimage.data, name)()
    h, w = array.shape[:2]
    s = min(h, w)
    square = Image.fromarray(array[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])
    return square.resize((size, size), Image.BICUBIC)


def build_dataset(root: Path, names: tuple[str, ...] = tuple(PHOTOS), size: int = 64,
                  without_gt_caption: tuple[str, ...] = ()) -> Path:
    """The official layout: HR/, LR/ (x4 down and back up, bicubic) and the three caption folders."""
    for sub in ("HR", "LR", "highlevel_prompt", "lowlevel_prompt_q", "lowlevel_prompt_q_GT"):
        (root / sub).mkdir(parents=True)
    for name in names:
        hr = photo(name, size)
        hr.save(root / "HR" / f"{name}.png")
        lr = hr.resize((size // 4, size // 4), Image.BICUBIC).resize((size, size), Image.BICUBIC)
        lr.save(root / "LR" / f"{name}.png")
        high, low = PHOTOS[name]
        (root / "highlevel_prompt" / f"{name}.txt").write_text(f" {high}\n")
        (root / "lowlevel_prompt_q" / f"{name}.txt").write_text(f"{low}\n")
        if name not in without_gt_caption:
            (root / "lowlevel_prompt_q_GT" / f"{name}.txt").write_text("sharp and clean, high quality\n")
    return root


def image_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
