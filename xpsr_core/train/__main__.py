"""``python -m xpsr_core.train --config configs/train_example.yaml``."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import CheckpointError
from .config import ConfigError, load_train_config
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.train",
                                     description="Train XPSR (SFA-ControlNet + conditional attention) on SD1.5.")
    parser.add_argument("--config", required=True, help="YAML training config (see configs/train_example.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        with logging_redirect_tqdm():
            Trainer(load_train_config(args.config)).run()
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
