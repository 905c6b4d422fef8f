"""``python -m xpsr_core.weights.convert <official checkpoint dir> <out.safetensors> [--dtype fp16]``

Turns the released ``checkpoint-N/`` folder (ControlNet + the whole 4.4 GB UNet) into the
pack's single file: the ControlNet and the UNet's conditional attention, nothing of the
stock SD1.5 UNet, which ComfyUI already has. Tensors are streamed one at a time.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError
from .checkpoint import DTYPES, convert_official


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.weights.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint", help="official checkpoint folder (with controlnet/ and unet/)")
    parser.add_argument("output", help="the .safetensors file to write (e.g. ComfyUI/models/xpsr/xpsr.safetensors)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="precision of the written weights (default fp32, as released)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error(f"output {args.output!r} must end in .safetensors")
    try:
        size = convert_official(args.checkpoint, args.output, DTYPES[args.dtype])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
