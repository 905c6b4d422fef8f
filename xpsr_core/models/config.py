"""Model configurations read from the official diffusers-style ``config.json`` files.

The released checkpoint stores one config per model (``controlnet/config.json``,
``unet/config.json``). Every size-dependent number is taken from there, so the same
code builds the SD1.5-sized release and the tiny test fixtures. Options the official
classes accept but XPSR never uses are refused with the key and value, rather than
silently ignored, so a config we cannot reproduce exactly never loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FUSIONS = ("parallel", "serial")

# Keys whose value must equal the default here: the official classes support them, XPSR
# (an SD1.5 model) does not use them, and this implementation does not build them.
_FIXED_KEYS: dict[str, Any] = {
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "use_linear_projection": False,
    "only_cross_attention": False,
    "upcast_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "global_pool_conditions": False,
    "use_rrdb": False,
    "controlnet_conditioning_channel_order": "rgb",
}


def _per_block(value: Any, n_blocks: int, key: str, source: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n_blocks
    if isinstance(value, (list, tuple)) and len(value) == n_blocks and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise CheckpointError(
        f"{source}: config key '{key}' is {value!r}; expected an int or a list of {n_blocks} ints"
    )


def _require(raw: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in raw:
        raise CheckpointError(f"{source}: config lacks the key '{key}'")
    return raw[key]


def _check_fixed(raw: Mapping[str, Any], source: str) -> None:
    for key, expected in _FIXED_KEYS.items():
        if key in raw and raw[key] != expected and not (expected == 1 and raw[key] == 1.0):
            raise CheckpointError(
                f"{source}: config key '{key}' is {raw[key]!r}; this implementation supports only {expected!r}"
            )


def _check_not_sdxl(raw: Mapping[str, Any], source: str) -> None:
    if raw.get("addition_embed_type") == "text_time" or raw.get("cross_attention_dim") == 2048:
        raise CheckpointError(
            f"{source}: this is an SDXL model (addition_embed_type={raw.get('addition_embed_type')!r}, "
            f"cross_attention_dim={raw.get('cross_attention_dim')!r}); XPSR is built on Stable Diffusion 1.5 "
            "(cross_attention_dim 768)"
        )


@dataclass(frozen=True)
class UNetShape:
    """The shape of an SD UNet (and of the ControlNet copied from its encoder)."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    layers_per_block: int
    cross_attention_dim: int
    num_heads: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    mid_block_scale_factor: float = 1.0

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def has_attention(self, block: int) -> bool:
        return self.down_block_types[block] == "CrossAttnDownBlock2D"

    def residual_channels(self) -> list[int]:
        """Channels of every skip (and ControlNet residual), in encoder order."""
        channels = [self.block_out_channels[0]]
        last = len(self.block_out_channels) - 1
        for i, c in enumerate(self.block_out_channels):
            channels += [c] * self.layers_per_block
            if i != last:
                channels.append(c)
        return channels


_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _unet_shape(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    _check_not_sdxl(raw, source)
    _check_fixed(raw, source)
    block_out = tuple(_require(raw, "block_out_channels", source))
    down_types = tuple(_require(raw, "down_block_types", source))
    for t in down_types:
        if t not in _DOWN_TYPES:
            raise CheckpointError(f"{source}: down block type '{t}' is not supported; expected one of {_DOWN_TYPES}")
    if len(down_types) != len(block_out):
        raise CheckpointError(
            f"{source}: {len(down_types)} down_block_types but {len(block_out)} block_out_channels; expected equal "
            "counts"
        )
    heads = raw.get("num_attention_heads") or _require(raw, "attention_head_dim", source)
    n = len(block_out)
    layers = _require(raw, "layers_per_block", source)
    if not isinstance(layers, int):
        raise CheckpointError(f"{source}: config key 'layers_per_block' is {layers!r}; expected an int")
    shape = dict(
        block_out_channels=block_out,
        down_block_types=down_types,
        layers_per_block=layers,
        cross_attention_dim=int(_require(raw, "cross_attention_dim", source)),
        num_heads=_per_block(heads, n, "attention_head_dim", source),
        transformer_layers_per_block=_per_block(raw.get("transformer_layers_per_block", 1), n,
                                                "transformer_layers_per_block", source),
        norm_num_groups=int(raw.get("norm_num_groups", 32)),
        norm_eps=float(raw.get("norm_eps", 1e-5)),
        in_channels=int(raw.get("in_channels", 4)),
        flip_sin_to_cos=bool(raw.get("flip_sin_to_cos", True)),
        freq_shift=int(raw.get("freq_shift", 0)),
        mid_block_scale_factor=float(raw.get("mid_block_scale_factor", 1.0)),
    )
    for c in block_out:
        if c % shape["norm_num_groups"]:
            raise CheckpointError(
                f"{source}: block_out_channels {list(block_out)} are not multiples of norm_num_groups "
                f"{shape['norm_num_groups']}"
            )
    return shape


@dataclass(frozen=True)
class ControlNetConfig(UNetShape):
    """The SFA-ControlNet: an SD encoder copy with semantic-fusion attention and DFC heads."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    return_rgbs: bool = True
    use_latent_pred: bool = True
    fusion: str = "parallel"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "controlnet config") -> ControlNetConfig:
        """Read the official ``controlnet/config.json`` (or the pack's normalised copy of it)."""
        if not raw.get("use_lowlevel_prompt", False):
            raise CheckpointError(
                f"{source}: 'use_lowlevel_prompt' is {raw.get('use_lowlevel_prompt')!r}; this is a stock ControlNet "
                "config, expected an XPSR ControlNet (use_lowlevel_prompt: true, semantic-fusion attention)"
            )
        fusion = raw.get("xpsr_fusion", "parallel")
        if fusion not in FUSIONS:
            raise CheckpointError(f"{source}: 'xpsr_fusion' is {fusion!r}; expected one of {FUSIONS}")
        emb = tuple(raw.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))
        return cls(
            **_unet_shape(raw, source),
            conditioning_channels=int(raw.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=emb,
            return_rgbs=bool(raw.get("return_rgbs", True)),
            use_latent_pred=bool(raw.get("use_latent_pred", True)),
            fusion=fusion,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config in the official key names, so ``from_dict`` reads it back unchanged."""
        d = asdict(self)
        d["attention_head_dim"] = list(d.pop("num_heads"))
        d["xpsr_fusion"] = d.pop("fusion")
        d["use_lowlevel_prompt"] = True
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class UNetConfig(UNetShape):
    """The SD1.5 UNet that XPSR extends with conditional (pixel) attention."""

    up_block_types: tuple[str, ...] = ()
    out_channels: int = 4

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "unet config") -> UNetConfig:
        """Read the official ``unet/config.json`` (or the pack's normalised copy of it)."""
        shape = _unet_shape(raw, source)
        up_types = tuple(_require(raw, "up_block_types", source))
        for t in up_types:
            if t not in _UP_TYPES:
                raise CheckpointError(f"{source}: up block type '{t}' is not supported; expected one of {_UP_TYPES}")
        expected_up = tuple(t.replace("Down", "Up") for t in reversed(shape["down_block_types"]))
        if up_types != expected_up:
            raise CheckpointError(
                f"{source}: up_block_types {list(up_types)} do not mirror the down blocks; expected {list(expected_up)}"
            )
        for key in ("up_use_lowlevel_prompt", "mid_use_lowlevel_prompt", "down_use_lowlevel_prompt"):
            value = raw.get(key, False)
            if any(value) if isinstance(value, list) else value:
                raise CheckpointError(
                    f"{source}: '{key}' is {value!r}; XPSR's UNet has no low-level attention (expected false)"
                )
        config = cls(**shape, up_block_types=up_types, out_channels=int(raw.get("out_channels", 4)))
        for d in config.decoder_layers():
            if d.context_channels != d.skip_channels:
                raise CheckpointError(
                    f"{source}: decoder layer up_blocks.{d.block}.{d.layer} would attend to a "
                    f"{d.skip_channels}-channel ControlNet residual with a {d.context_channels}-channel context; the "
                    "official model cannot run this config either"
                )
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config in the official key names, so ``from_dict`` reads it back unchanged."""
        d = asdict(self)
        d["attention_head_dim"] = list(d.pop("num_heads"))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def decoder_layers(self) -> list[DecoderLayer]:
        """Every decoder layer in execution order (ComfyUI's output-block order)."""
        rev_out = list(reversed(self.block_out_channels))
        rev_heads = list(reversed(self.num_heads))
        rev_depth = list(reversed(self.transformer_layers_per_block))
        n = len(rev_out)
        layers = self.layers_per_block + 1
        out = []
        for b in range(n):
            out_c = rev_out[b]
            in_c = rev_out[min(b + 1, n - 1)]
            for j in range(layers):
                skip_c = in_c if j == layers - 1 else out_c
                # The official UpBlock2D declares its pixel attentions with the block's own width
                # as context size; CrossAttnUpBlock2D uses the skip's width.
                context_c = out_c if self.up_block_types[b] == "UpBlock2D" else skip_c
                out.append(DecoderLayer(b, j, out_c, skip_c, context_c, rev_heads[b], rev_depth[b]))
        return out


@dataclass(frozen=True)
class DecoderLayer:
    """One UNet decoder layer: where a conditional attention sits and what it attends to."""

    block: int
    layer: int
    channels: int
    skip_channels: int
    context_channels: int
    heads: int
    depth: int


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``config.json``, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found; an official XPSR checkpoint folder has "
                              "controlnet/config.json and unet/config.json")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON config ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw
