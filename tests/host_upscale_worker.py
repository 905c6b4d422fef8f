"""scripts/upscale_folder.py in the test host: the command as a user runs it, its SD1.5 the tiny one.

    python -m torch.distributed.run --nproc_per_node N tests/host_upscale_worker.py --input ... --output ...

takes the command's arguments (--checkpoint is not read: the tiny SD1.5 of comfy_host stands in for it) and runs
its sharding, its executor and its summary unchanged, so tests can launch it under torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_host as H  # noqa: E402

TINY_BASE = {"class_type": "XPSRTestTinySD15", "inputs": {}}


def main() -> int:
    batch = H.load_script("upscale_folder")
    args = batch.parse_args(sys.argv[1:])
    ranks = batch.sharding.ranks_from_env()
    batch.sharding.start(ranks)
    H.setup_host()
    report = batch.upscale(args, H.pack_module("xpsr_core"), TINY_BASE, ranks)
    return batch.sharding.finish(report, ranks, "upscaled", "image")


if __name__ == "__main__":
    sys.exit(main())
