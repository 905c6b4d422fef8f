"""The whole pipeline against the official one: LR image in, restored image out, through the real nodes.

For every case of the e2e fixture (an official run of test.py and pipeline_xpsr.py on a tiny
SD1.5-shaped base, with every random draw recorded), ComfyUI's MODEL, CLIP and VAE are
built in fp32 from the fixture's diffusers folders, and Load Image, XPSR Loader (the official
checkpoint folder), XPSR Dual Prompt Encode and XPSR Sampler run in ComfyUI's executor with
the case's settings and the nodes' defaults otherwise. The official run drew, in order, the
two noises of its start latent and one variance noise per DDPM step; here both random
sources (the start latent's generator and the noise sampler of ComfyUI's DDPM sampler) draw
through ``torch.randn`` with a generator, which the test serves from the recorded draws in
the same order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.k_diffusion.sampling

from e2e_oracle import E2ECase, assert_close_l2, assert_image_close, e2e_fixture

FIXTURE = e2e_fixture()
CHECKPOINT_FOLDER = "e2e_official_checkpoint"


class RecordedDraws:
    """``torch.randn`` that answers every seeded draw with the official run's next recorded draw."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = draws
        self.served = 0
        self.randn = torch.randn

    def __call__(self, *size, generator=None, **kwargs) -> torch.Tensor:
        if generator is None:
            return self.randn(*size, **kwargs)
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        assert self.served < len(self.draws), f"draw {self.served} asked for; the official run drew {len(self.draws)}"
        draw = self.draws[self.served]
        assert tuple(draw.shape) == shape, f"draw {self.served}: shape {shape} asked for, {tuple(draw.shape)} recorded"
        self.served += 1
        return draw.to(dtype=kwargs.get("dtype") or torch.float32, device=kwargs.get("device", "cpu"))


def defaults(node_id: str) -> dict:
    """A node's widget defaults, as the frontend would fill them."""
    spec = H.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    return {name: options["default"] for name, (_, *rest) in spec.items() for options in rest if "default" in options}


def e2e_graph(case: E2ECase, lr_name: str, per_tile: bool = False) -> dict:
    """The case's graph; ``per_tile`` gives every latent tile its own copy of the case's prompts, through XPSR Tile
    Grid and Dual Prompt Encode's tile_grid, which must change nothing."""
    s = case.settings
    grid = {"scale": float(s["upscale"]), "process_size": s["process_size"], "tile_size": s["latent_tile"],
            "tile_overlap": s["latent_overlap"]}
    sampler = defaults("XPSRSampler") | grid | {
        "seed": s["seed"], "steps": s["steps"], "cfg": s["guidance"], "control_strength": s["cond_scale"]}
    tiles = {}
    if per_tile:
        lr = Image.open(Path(H.folder_paths.get_input_directory()) / lr_name)
        count = H.pack_module("xpsr_core.pipeline.tiling").processing_tile_grid(
            lr.height, lr.width, grid["scale"], grid["process_size"], grid["tile_size"], grid["tile_overlap"]).count
        assert count > 1, "the case is not tiled"
        tiles = {"9": {"class_type": "XPSRTileGrid", "inputs": grid | {"image": ["4", 0]}},
                 "10": {"class_type": "XPSRTestLines", "inputs": {"text": "|".join([s["high"]] * count)}},
                 "11": {"class_type": "XPSRTestLines", "inputs": {"text": "|".join([s["low"]] * count)}}}
    prompts = {"high_level": ["10", 0], "low_level": ["11", 0], "tile_grid": ["9", 0]} if per_tile else {
        "high_level": s["high"], "low_level": s["low"]}
    return tiles | {
        "1": {"class_type": "XPSRTestDiffusersSD15", "inputs": {"base": str(FIXTURE.base),
                                                                "checkpoint": str(FIXTURE.checkpoint)}},
        "2": {"class_type": "XPSRLoader", "inputs": {"model": ["1", 0], "xpsr_model": CHECKPOINT_FOLDER,
                                                      "weight_dtype": "auto"}},
        "3": {"class_type": "XPSRDualPromptEncode", "inputs": defaults("XPSRDualPromptEncode") | {
            "clip": ["1", 1]} | prompts},
        "4": {"class_type": "LoadImage", "inputs": {"image": lr_name}},
        "5": {"class_type": "XPSRSampler", "inputs": sampler | {
            "model": ["2", 0], "xpsr_controlnet": ["2", 1], "positive": ["3", 0], "negative": ["3", 1],
            "image": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 1], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


@pytest.fixture(scope="module")
def official_inputs() -> None:
    """The official checkpoint folder under models/xpsr and the LR images in ComfyUI's input folder."""
    assert not FIXTURE.checkpoint_mismatches(), f"{FIXTURE.checkpoint} is not the checkpoint the fixture was made with"
    H.setup_host()
    folder = Path(H.folder_paths.get_folder_paths("xpsr")[0]) / CHECKPOINT_FOLDER
    if not folder.exists():
        folder.symlink_to(FIXTURE.checkpoint, target_is_directory=True)
    for name in FIXTURE.case_names:
        shutil.copy(FIXTURE.case(name).image_path("lr"),
                    Path(H.folder_paths.get_input_directory()) / f"xpsr_e2e_{name}_lr.png")


@pytest.fixture(scope="module", params=[*FIXTURE.case_names, "tiled, per-tile prompts"])
def run(request, official_inputs) -> dict:
    """One case through the nodes: the executor's outputs and the latent after every DDPM step. The tiled case also
    runs with per-tile prompts, every tile's the case's own, against the same oracle."""
    name, per_tile = request.param.removesuffix(", per-tile prompts"), request.param.endswith("per-tile prompts")
    case = FIXTURE.case(name)
    draws = RecordedDraws(case.draws())
    steps = []
    ddpm_step = comfy.k_diffusion.sampling.DDPMSampler_step

    def recording_step(*args, **kwargs):
        latent = ddpm_step(*args, **kwargs)
        steps.append(latent.clone())  # the sampler rescales the returned latent in place
        return latent

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "randn", draws)
        patch.setattr(comfy.k_diffusion.sampling, "DDPMSampler_step", recording_step)
        executor, _ = H.run_ok(e2e_graph(case, f"xpsr_e2e_{case.name}_lr.png", per_tile))
    return {"case": case, "executor": executor, "steps": steps, "draws_served": draws.served}


def test_e2e_draws_are_taken_where_the_official_run_took_them(run):
    """Start latent (2 draws), then one per DDPM step but the last, whose variance is zero in both."""
    case = run["case"]
    assert case.settings["noise_tags"] == ["pipeline"] * 2 + ["ddpm_step"] * case.settings["steps"]
    assert run["draws_served"] == 2 + case.settings["steps"] - 1


def test_e2e_prompt_defaults_are_the_official_ones(official_inputs):
    prompts = defaults("XPSRDualPromptEncode")
    for case in map(FIXTURE.case, FIXTURE.case_names):
        assert prompts["added_prompt"] == FIXTURE.meta["added_prompt"]
        assert case.settings["prompt_high_full"] == f"{case.settings['high']} {prompts['added_prompt']}"
        assert (prompts["negative_high"], prompts["negative_low"]) == (case.settings["negative_high"],
                                                                      case.settings["negative_low"])


def test_e2e_prompt_embeddings_match(run):
    case, executor = run["case"], run["executor"]
    (c_h, positive), = H.output(executor, "3", 0)
    (neg_c_h, negative), = H.output(executor, "3", 1)
    assert_close_l2(c_h, case["c_h"], "c_h")
    assert_close_l2(neg_c_h, case["neg_c_h"], "negative c_h")
    assert_close_l2(positive["model_conds"]["xpsr_lowlevel"].cond, case["c_l"], "c_l")
    assert_close_l2(negative["model_conds"]["xpsr_lowlevel"].cond, case["neg_c_l"], "negative c_l")


def test_e2e_every_step_latent_matches(run):
    case = run["case"]
    assert len(run["steps"]) == case.settings["steps"]
    for k, (ours, official) in enumerate(zip(run["steps"], case.latents(), strict=True)):
        assert_close_l2(ours, official, f"latent after step {k} (timestep {case.settings['timesteps'][k]})")
    latent_format = H.output(run["executor"], "1", 0).get_model_object("latent_format")
    final = latent_format.process_in(H.output(run["executor"], "5", 1)["samples"])
    assert_close_l2(final, case.latents()[-1], "the LATENT output")


def test_e2e_decoded_image_matches(run):
    decoded = H.output(run["executor"], "6", 0).movedim(-1, 1)
    official = (run["case"]["decoded"].clamp(-1, 1) + 1) / 2
    assert_close_l2(decoded, official, "decoded image")


def test_e2e_final_image_matches_and_has_the_official_size(run):
    case = run["case"]
    image = H.output(run["executor"], "5", 0)
    assert [image.shape[2], image.shape[1]] == case.settings["final_size"]
    assert_image_close(image.movedim(-1, 1), case.image("final"), "final image")
