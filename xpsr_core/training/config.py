"""The training configuration: a flat YAML file whose keys and defaults follow the official train.py.

Every key is checked on load (unknown keys, types, ranges), so a typo fails before a model is
loaded rather than silently falling back to a default. ``configs/train_example.yaml``
documents each key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from .losses import DFC_FORMS, DFC_WEIGHT


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the file, the key and what was expected."""


HIGHLEVEL_PROMPTS = ("empty", "caption")
MIXED_PRECISION = ("no", "fp16", "bf16")
SINGLE_FILE_DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Relative paths are taken from the working directory, as in the official train.py."""

    pretrained_model: str
    train_data_dir: tuple[str, ...]
    output_dir: str
    base_configs: str | None = None
    tokenizer: str | None = None
    resolution: int = 512
    highlevel_prompt: str = "empty"
    original_image_ratio: float = 0.1
    dfc_form: str = "official"
    dfc_weight: float = DFC_WEIGHT
    seed: int = 0
    max_train_steps: int = 100_000
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    shard_optimizer_state: bool = False
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 500
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    single_file_dtype: str = "fp32"
    resume_from_checkpoint: str | None = None
    dataloader_num_workers: int = 0
    device: str = "auto"
    progress_bar: bool = True


_CHOICES = {
    "highlevel_prompt": HIGHLEVEL_PROMPTS,
    "dfc_form": DFC_FORMS,
    "mixed_precision": MIXED_PRECISION,
    "single_file_dtype": SINGLE_FILE_DTYPES,
    "device": DEVICES,
}
_POSITIVE = ("resolution", "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
_NON_NEGATIVE = ("learning_rate", "adam_weight_decay", "adam_epsilon", "lr_warmup_steps", "max_grad_norm",
                 "dfc_weight", "dataloader_num_workers")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Accept ``value`` for a field of type ``tp`` (ints for floats too), or raise naming the key."""
    args = get_args(tp)
    if get_origin(tp) is Union or type(None) in args:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if get_origin(tp) is tuple:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and items and all(isinstance(v, str) for v in items):
            return tuple(items)
        raise ConfigError(f"{source}: '{key}' is {value!r}; expected a path or a non-empty list of paths")
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' is {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def train_config_from_dict(raw: dict[str, Any], source: str = "training config") -> TrainConfig:
    """Validate a parsed config, naming ``source`` in every error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, found {type(raw).__name__}")
    hints = get_type_hints(TrainConfig)
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{unknown[0]}'; the keys are: {', '.join(known)}")
    for key in ("pretrained_model", "train_data_dir", "output_dir"):
        if raw.get(key) in (None, ""):
            raise ConfigError(f"{source}: '{key}' is required")
    values = {key: _coerce(key, value, hints[key], source) for key, value in raw.items()}
    for key, choices in _CHOICES.items():
        if key in values and values[key] not in choices:
            raise ConfigError(f"{source}: '{key}' is {values[key]!r}; expected one of {', '.join(choices)}")
    for key in _POSITIVE:
        if key in values and values[key] <= 0:
            raise ConfigError(f"{source}: '{key}' is {values[key]}; expected a positive number")
    for key in _NON_NEGATIVE:
        if key in values and values[key] < 0:
            raise ConfigError(f"{source}: '{key}' is {values[key]}; expected zero or more")
    if values.get("resolution", 512) % 8:
        raise ConfigError(f"{source}: 'resolution' is {values['resolution']}; expected a multiple of 8 (the VAE's "
                          "downscale factor)")
    if not 0.0 <= values.get("original_image_ratio", 0.1) <= 1.0:
        raise ConfigError(f"{source}: 'original_image_ratio' is {values['original_image_ratio']}; expected 0 to 1")
    for key in ("adam_beta1", "adam_beta2"):
        if key in values and not 0.0 <= values[key] < 1.0:
            raise ConfigError(f"{source}: '{key}' is {values[key]}; expected at least 0 and below 1")
    limit = values.get("checkpoints_total_limit")
    if limit is not None and limit < 1:
        raise ConfigError(f"{source}: 'checkpoints_total_limit' is {limit}; expected a positive number or null")
    return TrainConfig(**values)


def load_train_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return train_config_from_dict(raw if raw is not None else {}, str(path))
