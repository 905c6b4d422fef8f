"""Loading XPSR weights: the official checkpoint folder and the pack's single file.

Two layouts hold the same tensors:

* the official folder ``checkpoint-N/{controlnet,unet}/`` with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or ``.bin``), as the released training wrote it;
  its ``unet/`` holds the whole SD1.5 UNet, of which XPSR needs only the 312
  conditional-attention tensors;
* one ``.safetensors`` with the ControlNet (``controlnet.*``) and the conditional attention
  (``conditional_attention.*``), both configs in its metadata, in fp32, fp16 or bf16. This
  is what ``python -m xpsr_core.weights.convert`` writes and what users drop into ``models/xpsr``.

Every tensor is checked against the shapes the config implies before anything is built;
each failure names the file, the key and what was expected.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, first_line
from ..models.attention import AttentionFunction, sdpa_attention
from ..models.conditional_attention import PIXEL_ATTENTIONS_KEY, ConditionalAttention
from ..models.config import ControlNetConfig, UNetConfig, read_config_file
from ..models.controlnet import SFAControlNet
from ..models.operations import Operations, default_operations
from ..models.unet import UNet2DCondition
from .safetensors_io import read_header, write_streaming

FORMAT = "xpsr"
FORMAT_VERSION = "1"
CONTROLNET_PREFIX = "controlnet."
CONDITIONAL_PREFIX = "conditional_attention."
OFFICIAL_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Shapes = dict[str, tuple[int, ...]]


@dataclass
class XPSRCheckpoint:
    """The configs and state dicts of XPSR's two trained parts."""

    controlnet_config: ControlNetConfig
    unet_config: UNetConfig
    controlnet: dict[str, torch.Tensor]
    conditional_attention: dict[str, torch.Tensor]


class WeightFile:
    """One weights file, read lazily: shapes first, each tensor when asked for, through one open handle."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self.shapes = {k: v.shape for k, v in read_header(path).tensors.items()}
            self.get: Callable[[str], torch.Tensor] = safe_open(str(path), framework="pt", device="cpu").get_tensor
        else:
            tensors = _load_torch_file(path)
            self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            self.get = tensors.__getitem__

    def get_many(self, keys: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {k: _cast(self.get(k), dtype) for k in keys}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: could not be read: it holds Python objects besides tensors, and loading runs no code "
            "(weights_only=True); convert it to .safetensors from a trusted environment"
        ) from e
    except Exception as e:  # torch raises several types for foreign or damaged files
        raise CheckpointError(
            f"{path}: could not be read as a PyTorch weights file ({first_line(e)}); is it truncated or not a "
            "state dict?"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {type(sd).__name__}")
    return sd


def module_shapes(factory: Callable[[], nn.Module]) -> Shapes:
    """Parameter shapes of a module built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in factory().state_dict().items()}


def controlnet_shapes(config: ControlNetConfig) -> Shapes:
    return module_shapes(lambda: SFAControlNet(config))


def conditional_attention_shapes(config: UNetConfig) -> Shapes:
    return module_shapes(lambda: ConditionalAttention(config))


def stock_unet_shapes(config: UNetConfig) -> Shapes:
    return module_shapes(lambda: UNet2DCondition(config))


def identify_foreign(keys: set[str] | dict[str, Any]) -> str | None:
    """Name the kind of model a key set belongs to when it is not XPSR's, for error messages."""
    def any_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_prefix("conditioner.embedders.1.", "add_embedding.") or any(".label_emb." in k or k.startswith("label_emb.")
                                                                       for k in keys):
        return "an SDXL model (XPSR is built on Stable Diffusion 1.5)"
    if any_prefix("model.diffusion_model.", "first_stage_model.", "cond_stage_model."):
        return "a Stable Diffusion checkpoint (it belongs in models/checkpoints; XPSR loads on top of it)"
    if any_prefix("control_model.", "input_hint_block.", "zero_convs."):
        return "a stock ControlNet in the original (ldm) layout"
    if "controlnet_cond_embedding.conv_in.weight" in keys and not any(".attentions_lowlevel." in k for k in keys):
        return "a stock ControlNet (no semantic-fusion attention: no down_blocks.*.attentions_lowlevel.* keys)"
    if "conv_out.weight" in keys and any_prefix("up_blocks.") and not any(PIXEL_ATTENTIONS_KEY in k for k in keys):
        return "a stock SD UNet (no conditional attention: no up_blocks.*.pixel_attentions.* keys)"
    return None


def check_tensors(found: Shapes, expected: Shapes, file: Path | str, what: str) -> None:
    """Raise on the first missing, misshapen or unexpected tensor, naming file, key and expectation."""
    missing = [k for k in expected if k not in found]
    if missing:
        k = missing[0]
        raise CheckpointError(
            f"{file}: missing key '{k}' (expected shape {list(expected[k])}); {len(missing)} of the {len(expected)} "
            f"{what} tensors are missing"
        )
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise CheckpointError(
                f"{file}: key '{k}' has shape {list(found[k])}, expected {list(shape)} for this {what} config"
            )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{file}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all); expected only the {len(expected)} "
            f"{what} tensors"
        )


def _reject_foreign(keys: set[str] | dict[str, Any], file: Path, expected_kind: str) -> None:
    kind = identify_foreign(keys)
    if kind is not None:
        raise CheckpointError(f"{file}: this is {kind}, not {expected_kind}")


def find_weights_file(folder: Path, names: tuple[str, ...] = OFFICIAL_WEIGHT_NAMES, what: str = "weights file") -> Path:
    """The first of ``names`` (in order of preference) that ``folder`` holds: the one picker for the weights of a
    diffusers model folder (XPSR's controlnet/ and unet/ here, SD1.5's unet/ in sd15.py)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no {what}; expected one of {', '.join(names)}")


@dataclass
class OfficialCheckpoint:
    """An official checkpoint folder, validated, with its tensors still on disk."""

    controlnet_config: ControlNetConfig
    unet_config: UNetConfig
    controlnet_file: WeightFile
    unet_file: WeightFile
    controlnet_shapes: Shapes
    conditional_shapes: Shapes


def open_official(folder: str | Path) -> OfficialCheckpoint:
    """Validate ``checkpoint-N/`` (configs, key sets, shapes) without reading tensor data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected an official XPSR checkpoint folder "
                              "(checkpoint-N with controlnet/ and unet/)")
    if not (folder / "controlnet").is_dir() or not (folder / "unet").is_dir():
        inner = sorted(p.name for p in folder.glob("checkpoint-*") if (p / "controlnet").is_dir())
        hint = f"; it contains {', '.join(inner)}: point at one of those" if inner else ""
        raise CheckpointError(f"{folder}: expected the subfolders controlnet/ and unet/ of an official XPSR "
                              f"checkpoint{hint}")
    cn_config_path = folder / "controlnet" / "config.json"
    un_config_path = folder / "unet" / "config.json"
    cn_config = ControlNetConfig.from_dict(read_config_file(cn_config_path), str(cn_config_path))
    un_config = UNetConfig.from_dict(read_config_file(un_config_path), str(un_config_path))

    cn_file = WeightFile(find_weights_file(folder / "controlnet"))
    _reject_foreign(cn_file.shapes, cn_file.path, "an XPSR ControlNet")
    cn_shapes = controlnet_shapes(cn_config)
    check_tensors(cn_file.shapes, cn_shapes, cn_file.path, "XPSR ControlNet")

    un_file = WeightFile(find_weights_file(folder / "unet"))
    _reject_foreign(un_file.shapes, un_file.path, "XPSR's UNet")
    ca_shapes = conditional_attention_shapes(un_config)
    check_tensors(un_file.shapes, {**stock_unet_shapes(un_config), **ca_shapes}, un_file.path,
                  "XPSR UNet (stock SD UNet + conditional attention)")
    return OfficialCheckpoint(cn_config, un_config, cn_file, un_file, cn_shapes, ca_shapes)


def load_official(folder: str | Path, dtype: torch.dtype | None = None) -> XPSRCheckpoint:
    """Load the ControlNet and the conditional attention of an official checkpoint folder."""
    ckpt = open_official(folder)
    return XPSRCheckpoint(
        ckpt.controlnet_config, ckpt.unet_config,
        ckpt.controlnet_file.get_many(list(ckpt.controlnet_shapes), dtype),
        ckpt.unet_file.get_many(list(ckpt.conditional_shapes), dtype),
    )


def _metadata_config(meta: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: metadata entry '{key}' is missing or not JSON; the file is damaged") from e


def load_xpsr_single_file(path: str | Path, dtype: torch.dtype | None = None) -> XPSRCheckpoint:
    """Load the pack's single-file format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file written by `python -m xpsr_core.weights.convert`, "
                              "or an official checkpoint folder")
    header = read_header(path)
    if header.metadata.get("format") != FORMAT:
        kind = identify_foreign(header.tensors) or "not an XPSR model file (no 'format: xpsr' metadata)"
        if not kind.startswith("not"):
            kind = f"{kind}, not an XPSR model file"
        raise CheckpointError(f"{path}: this is {kind}; expected the single file written by "
                              "`python -m xpsr_core.weights.convert <official checkpoint folder> <out.safetensors>`")
    if header.metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {header.metadata.get('format_version')!r}; this version of the "
                              f"pack reads version {FORMAT_VERSION}")
    cn_config = ControlNetConfig.from_dict(_metadata_config(header.metadata, "controlnet_config", path),
                                           f"{path} (controlnet_config)")
    un_config = UNetConfig.from_dict(_metadata_config(header.metadata, "unet_config", path), f"{path} (unet_config)")
    expected = {**{CONTROLNET_PREFIX + k: v for k, v in controlnet_shapes(cn_config).items()},
                **{CONDITIONAL_PREFIX + k: v for k, v in conditional_attention_shapes(un_config).items()}}
    check_tensors({k: v.shape for k, v in header.tensors.items()}, expected, path, "XPSR single-file")
    tensors = WeightFile(path).get_many(list(expected), dtype)
    split = {p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
             for p in (CONTROLNET_PREFIX, CONDITIONAL_PREFIX)}
    return XPSRCheckpoint(cn_config, un_config, split[CONTROLNET_PREFIX], split[CONDITIONAL_PREFIX])


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> XPSRCheckpoint:
    """Load either layout: a folder is read as an official checkpoint, a file as the pack's single file."""
    path = Path(path)
    if path.is_dir():
        return load_official(path, dtype)
    return load_xpsr_single_file(path, dtype)


def single_file_metadata(controlnet_config: ControlNetConfig, unet_config: UNetConfig) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "controlnet_config": json.dumps(controlnet_config.to_dict()),
        "unet_config": json.dumps(unet_config.to_dict()),
    }


def save_single_file(ckpt: XPSRCheckpoint, path: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Write ``ckpt`` in the pack's single-file format; returns the file size."""
    tensors = {**{CONTROLNET_PREFIX + k: v for k, v in ckpt.controlnet.items()},
               **{CONDITIONAL_PREFIX + k: v for k, v in ckpt.conditional_attention.items()}}
    entries = [(k, tuple(v.shape), dtype) for k, v in sorted(tensors.items())]
    return write_streaming(path, entries, tensors.__getitem__,
                           single_file_metadata(ckpt.controlnet_config, ckpt.unet_config))


def convert_official(folder: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Convert an official checkpoint folder into the single file, one tensor in memory at a time."""
    ckpt = open_official(folder)
    sources = {CONTROLNET_PREFIX: (ckpt.controlnet_file, ckpt.controlnet_shapes),
               CONDITIONAL_PREFIX: (ckpt.unet_file, ckpt.conditional_shapes)}
    entries = sorted((prefix + k, shape, dtype) for prefix, (_, shapes) in sources.items()
                     for k, shape in shapes.items())

    def fetch(name: str) -> torch.Tensor:
        prefix = CONTROLNET_PREFIX if name.startswith(CONTROLNET_PREFIX) else CONDITIONAL_PREFIX
        return sources[prefix][0].get(name[len(prefix):])

    return write_streaming(out, entries, fetch, single_file_metadata(ckpt.controlnet_config, ckpt.unet_config))


def _with_weights(factory: Callable[[], nn.Module], state: dict[str, torch.Tensor], device: Any,
                  dtype: torch.dtype | None) -> nn.Module:
    """``factory()``'s module built on the meta device, with ``state`` (cast) as its parameters.

    No memory is spent on an initialisation that is thrown away. Each tensor gets an
    allocation of its own: a tensor read from a safetensors file is a view into the file's
    buffer at an offset the header decides, and CPU kernels take other paths (with other
    rounding) on such unaligned weights than on the same weights freshly allocated.
    """
    with torch.device("meta"):
        module = factory()
    state = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def build_controlnet(ckpt: XPSRCheckpoint, *, attention: AttentionFunction = sdpa_attention,
                     operations: Operations = default_operations, device: Any = None,
                     dtype: torch.dtype | None = None) -> SFAControlNet:
    """The SFA-ControlNet with the checkpoint's weights."""
    return _with_weights(lambda: SFAControlNet(ckpt.controlnet_config, attention=attention, operations=operations),
                         ckpt.controlnet, device, dtype)


def build_conditional_attention(ckpt: XPSRCheckpoint, *, attention: AttentionFunction = sdpa_attention,
                                operations: Operations = default_operations, device: Any = None,
                                dtype: torch.dtype | None = None) -> ConditionalAttention:
    """The UNet's conditional attention with the checkpoint's weights."""
    return _with_weights(lambda: ConditionalAttention(ckpt.unet_config, attention=attention, operations=operations),
                         ckpt.conditional_attention, device, dtype)


def build_models(ckpt: XPSRCheckpoint, *, attention: AttentionFunction = sdpa_attention,
                 operations: Operations = default_operations, device: Any = None,
                 dtype: torch.dtype | None = None) -> tuple[SFAControlNet, ConditionalAttention]:
    """The ControlNet and the conditional attention with the checkpoint's weights."""
    settings = {"attention": attention, "operations": operations, "device": device, "dtype": dtype}
    return build_controlnet(ckpt, **settings), build_conditional_attention(ckpt, **settings)
