"""Records the pack's node interfaces in tests/node_schemas.json, the reference test_host_node_schemas.py compares with.

Run it only after a deliberate addition to a node (a new node, input, widget at the end or
output), check the diff, and commit the file:

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_node_schemas.py

It is a separate command because a test that rewrote the file would compare it with itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def main() -> None:
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed in this Python")
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    from test_host_node_schemas import GOLDEN, current

    GOLDEN.write_text(json.dumps(current(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
