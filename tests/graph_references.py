"""Stored outputs of the host graph tests: the graphs, the reference file, and the comparison.

The tiny models are deterministic (fixed random weights, fixed seeds), so each graph's XPSR
Sampler outputs are pinned by a reference recorded once, not only their shape. A seed's
sampler noise is ComfyUI's, and ComfyUI changed it after 0.3.64 (0.33.0's default noise
sampler adds 1 to the seed on the CPU), so the references are kept per kind of host noise
(``sampler_noise``). They live in fixtures/host_graph_references.safetensors, written only by

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_graph_references.py

(never by a test). Re-record after a deliberate change of the pipeline's numbers (xpsr_core,
nodes) or of the tiny models and graphs (comfy_host.py, GRAPHS below), and say why in the
commit. The file records a fingerprint of the parity fixture its models came from; with
another fixture (XPSR_PARITY_FIXTURE) the values are not compared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import comfy_host as H

from parity import assert_parity, parity_fixture

REFERENCES = Path(__file__).parent / "fixtures" / "host_graph_references.safetensors"
SAMPLER = "5"
"""The XPSR Sampler's node id in comfy_host.graph()."""


def per_image_prompts(prompts: str, images: int) -> dict:
    """A batch of 16x16 images with one high-level prompt each ('|'-separated) through a STRING list."""
    prompt = H.graph(height=16, width=16, batch=images, scale=2.0)
    prompt["7"] = {"class_type": "XPSRTestLines", "inputs": {"text": prompts}}
    prompt["3"]["inputs"]["high_level"] = ["7", 0]
    return prompt


def weight_dtype_graph(weight_dtype: str) -> dict:
    prompt = H.graph(seed=41)
    prompt["2"]["inputs"]["weight_dtype"] = weight_dtype
    return prompt


GRAPHS: dict[str, Callable[[], dict]] = {
    "whole": lambda: H.graph(tile_size=320, tile_overlap=2),
    "tiled": lambda: H.graph(tile_size=16, tile_overlap=4),
    **{f"channels_{c}": (lambda c=c: H.graph(height=16, width=24, channels=c, scale=2.0)) for c in (1, 2, 4)},
    "batch_of_3": lambda: H.graph(height=16, width=20, batch=3, scale=2.0),
    **{f"start_{start}": (lambda start=start: H.graph(start=start, denoise=0.5, sampler_name="euler",
                                                      scheduler="karras"))
       for start in ("official", "noise", "img2img")},
    **{f"weights_{dtype}": (lambda dtype=dtype: weight_dtype_graph(dtype)) for dtype in ("fp16", "bf16", "fp32")},
    "tiled_vae_wavelet": lambda: H.graph(seed=61, vae_tiling="on", color_fix="wavelet"),
    "per_image_prompts": lambda: per_image_prompts("a red brick wall|a green field|a blue sky", 3),
}
"""Every graph whose outputs are stored, by name; the tests run these very prompts.

Each is stable to about 1e-5 relative between 1 and 2 CPU threads. Some settings are not and
are left out: 8-px latent tiles (the tiny UNet's deepest level is then 1 px, 1e-2 between
thread counts) and the prompt "a dog" (7e-3), amplifications of the random tiny models.
"""


def run_graph(name: str):
    """The named graph run in a fresh executor (it must succeed)."""
    executor, _ = H.run_ok(GRAPHS[name]())
    return executor


def stored_outputs(executor) -> dict[str, torch.Tensor]:
    """What is kept of the sampler's outputs: the latent, and the image averaged over 4x4 px blocks (small)."""
    image = H.output(executor, SAMPLER).movedim(-1, 1)
    return {"latent": H.output(executor, SAMPLER, 1)["samples"].float().contiguous(),
            "image_4x4_mean": torch.nn.functional.avg_pool2d(image.float(), 4).contiguous()}


@cache
def fixture_fingerprint() -> str:
    """sha256 of the parity fixture's checkpoint, whose UNet and XPSR weights the graphs run."""
    digest = hashlib.sha256()
    for path in sorted(parity_fixture().checkpoint.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(parity_fixture().checkpoint).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@cache
def sampler_noise() -> str:
    """What noise the host's samplers draw for a seed on the CPU: a digest of ComfyUI's default noise sampler's
    first draw for seed 0, the part of the host the stochastic graphs' references depend on."""
    import comfy.k_diffusion.sampling

    draw = comfy.k_diffusion.sampling.default_noise_sampler(torch.zeros(16), seed=0)(None, None)
    return hashlib.sha256(draw.numpy().tobytes()).hexdigest()[:12]


def reference_key(name: str, kind: str) -> str:
    return f"{sampler_noise()}/{name}.{kind}"


def assert_matches_reference(name: str, executor) -> None:
    """The graph's stored outputs equal the reference within the parity bound (scaled to the reference's size).

    1e-4 * max(1, max |reference|) leaves room for CPU thread counts and kernels (about 1e-6
    relative) and catches any change of the computation.
    """
    assert REFERENCES.is_file(), f"{REFERENCES} is missing; record it with tests/record_graph_references.py"
    with safe_open(REFERENCES, "pt") as references:
        recorded_with = references.metadata().get("fixture_sha256")
        if recorded_with != fixture_fingerprint():
            pytest.skip(f"{REFERENCES.name} was recorded with another parity fixture; set XPSR_PARITY_FIXTURE "
                        "back, or re-record with tests/record_graph_references.py")
        for kind, actual in stored_outputs(executor).items():
            key = reference_key(name, kind)
            assert key in references.keys(), (f"no reference {key} for this host's sampler noise; record it on this "
                                              "host with tests/record_graph_references.py")
            assert_parity(actual, references.get_tensor(key), f"graph '{name}' {kind} vs its stored reference")
