"""Records the host graph tests' reference outputs in tests/fixtures/host_graph_references.safetensors.

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_graph_references.py [NAME ...]

Runs every graph of graph_references.GRAPHS (or the named ones, keeping the others' stored
values) in ComfyUI's executor on the CPU and stores the XPSR Sampler's latent and its image
averaged over 4x4 px blocks, under this host's sampler noise; what was recorded on hosts with
other noise is kept (record on each host CI tests). Run it only after a deliberate change of
the pipeline's numbers or of the tiny models, check that the tests failed for that reason
alone, and commit the file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def main(names: list[str]) -> None:
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout whose requirements are installed in this Python")
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    import torch
    from safetensors.torch import load_file, save_file

    import graph_references as R

    unknown = sorted(set(names) - set(R.GRAPHS))
    if unknown:
        sys.exit(f"unknown graphs {unknown}; known: {sorted(R.GRAPHS)}")
    tensors = load_file(R.REFERENCES) if R.REFERENCES.is_file() else {}
    if not names:
        tensors = {key: value for key, value in tensors.items()
                   if "/" in key and not key.startswith(f"{R.sampler_noise()}/")}
    for name in names or list(R.GRAPHS):
        print(f"running {name}", flush=True)
        for kind, value in R.stored_outputs(R.run_graph(name)).items():
            tensors[R.reference_key(name, kind)] = value
    metadata = {"fixture_sha256": R.fixture_fingerprint(), "torch": torch.__version__,
                "threads": str(torch.get_num_threads())}
    save_file(tensors, R.REFERENCES, metadata=metadata)
    print(f"wrote {len(tensors)} tensors, {R.REFERENCES.stat().st_size} bytes, to {R.REFERENCES}")


if __name__ == "__main__":
    main(sys.argv[1:])
