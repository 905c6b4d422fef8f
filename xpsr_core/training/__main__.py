"""``python -m xpsr_core.training --config configs/train_example.yaml``, or under
``torchrun --nproc_per_node N [--nnodes M ...] -m xpsr_core.training --config ...`` on N devices per node."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import CheckpointError
from .config import ConfigError, load_train_config
from .distributed import process_group
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.training",
                                     description="Train XPSR (SFA-ControlNet + conditional attention) on SD1.5.")
    parser.add_argument("--config", required=True, help="YAML training config (see configs/train_example.yaml)")
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args.config)
        with process_group(config.device) as ranks:
            where = f"rank {ranks.rank} " if ranks.distributed else ""
            logging.basicConfig(level=logging.INFO if ranks.is_main else logging.WARNING,
                                format=f"%(asctime)s {where}%(name)s: %(message)s")
            with logging_redirect_tqdm():
                Trainer(config).run()
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
