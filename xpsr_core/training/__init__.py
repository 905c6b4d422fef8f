"""Training XPSR outside ComfyUI: ``python -m xpsr_core.training --config <yaml>``.

Needs diffusers (the VAE), transformers (the CLIP text encoder and tokenizer), PyYAML and
tqdm besides torch; the rest of xpsr_core does not.
"""

from .config import ConfigError, TrainConfig, load_train_config, train_config_from_dict
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "load_train_config", "train_config_from_dict"]
