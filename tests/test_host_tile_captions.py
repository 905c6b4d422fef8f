"""XPSR Caption per latent tile: with a tile grid it captions the tiles XPSR Sampler will denoise, batched, by either
route (an MLLM from XPSR MLLM Loader, or a ComfyUI CLIP that generates text), each tile as if captioned alone."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="MLLM captioning needs transformers")

import torch  # noqa: E402

import comfy_host as H  # noqa: E402  (skips this module without COMFYUI_PATH)

import tiny_comfy_vlm  # noqa: E402
import tiny_vlm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MLLMS = {"llava": "llava-hf/llava-tiny", "qwen2_vl": "Qwen/Qwen2-VL-tiny"}
SETTINGS = {"scale": 4.0, "process_size": 64, "tile_size": 8, "tile_overlap": 2}  # 24 x 32 px: 2 x 3 tiles of 64 px
TILES = 6
INSTRUCTIONS = ("Describe the content.", "Describe the quality.")


@pytest.fixture(scope="module")
def mllms() -> dict:
    H.setup_host()
    base = H.WORK / "models_llm"
    for kind, name in MLLMS.items():
        if not (base / name).is_dir():
            tiny_vlm.BUILDERS[kind](base / name)
    H.folder_paths.folder_names_and_paths["LLM"] = ([str(base)], set())
    caption = H.pack_module("nodes.caption")
    return {kind: caption.load_mllm(name, "fp32", False) for kind, name in MLLMS.items()}


def captioner(kind: str, mllms: dict) -> dict:
    if kind == "comfy_vlm":
        return {"clip": tiny_comfy_vlm.shared()}
    return {"mllm": mllms[kind]}


def caption(image: torch.Tensor, source: dict, tokens: int = 6, **settings) -> tuple[list[str], list[str]]:
    return tuple(H.pack_module("nodes.caption").XPSRCaption.execute(image, *INSTRUCTIONS, tokens, False, **source,
                                                                     **settings).result)


def tile_grid(image: torch.Tensor, **settings):
    return H.pack_module("nodes.tile_grid").XPSRTileGrid.execute(image, **(SETTINGS | settings)).args


ROUTES = [pytest.param("llava"), pytest.param("qwen2_vl", marks=pytest.mark.skipif(
    bool(tiny_vlm.qwen2_vl_unavailable()), reason=str(tiny_vlm.qwen2_vl_unavailable()))),
          pytest.param("comfy_vlm", marks=H.text_generation)]


@pytest.mark.parametrize("kind", ROUTES)
def test_tiles_captioned_in_one_batch_are_each_tile_captioned_alone(kind: str, mllms: dict):
    image = H.test_image(24, 32, batch=2, seed=4)
    grid, tiles, count = tile_grid(image)
    assert count == TILES
    source = captioner(kind, mllms)
    high, low = caption(image, source, tile_grid=grid, whole_image_context=False, batch_size=2 * TILES)
    assert len(high) == len(low) == 2 * TILES
    alone = [caption(tiles[k:k + 1], source, batch_size=1) for k in range(2 * TILES)]
    assert (high, low) == ([a[0][0] for a in alone], [a[1][0] for a in alone])
    assert (high, low) == caption(image, source, tile_grid=grid, whole_image_context=False, batch_size=1)


@pytest.mark.parametrize("kind", ROUTES)
def test_the_whole_images_captions_come_in_front_of_each_of_its_tiles(kind: str, mllms: dict):
    image = H.test_image(24, 32, batch=2, seed=4)
    grid, _, _ = tile_grid(image)
    source = captioner(kind, mllms)
    own_high, own_low = caption(image, source, tile_grid=grid, whole_image_context=False)
    whole_high, whole_low = caption(image, source)
    high, low = caption(image, source, tile_grid=grid)  # whole_image_context is on by default
    for k in range(2 * TILES):
        b = k // TILES
        assert high[k] == f"{whole_high[b]} {own_high[k]}".strip() and low[k] == f"{whole_low[b]} {own_low[k]}".strip()


def test_a_tile_grid_made_for_another_image_is_refused_naming_both(mllms: dict):
    image = H.test_image(24, 32, seed=4)
    grid, _, _ = tile_grid(H.test_image(40, 32, seed=4))
    with pytest.raises(ValueError, match=r"tile_grid is 3x3 tiles of 64 px over a 128x160 px processed image .* "
                                         r"for 1 image\(s\), but image \(1 image\(s\) of 32x24 px\) gives 3x2 "
                                         r"tiles of 64 px over a 128x96 px processed image"):
        caption(image, {"mllm": mllms["llava"]}, tile_grid=grid)
    batch_grid, _, _ = tile_grid(H.test_image(24, 32, batch=2))
    with pytest.raises(ValueError, match=r"for 2 image\(s\), but image \(1 image\(s\) of 32x24 px\)"):
        caption(image, {"mllm": mllms["llava"]}, tile_grid=batch_grid)


def test_per_tile_captions_feed_the_tiled_sampler_through_comfyuis_executor(mllms: dict):
    """Load an image -> XPSR Tile Grid -> XPSR Caption (tile_grid) -> Dual Prompt Encode (tile_grid) -> XPSR
    Sampler, as the xpsr_tile_captions workflow wires them: one caption pair per tile reaches the sampler."""
    prompt = H.graph(height=24, width=32, steps=2, **SETTINGS) | {
        "9": {"class_type": "XPSRTileGrid", "inputs": SETTINGS | {"image": ["4", 0]}},
        "20": {"class_type": "XPSRMLLMLoader", "inputs": {"model": MLLMS["llava"], "dtype": "fp32",
                                                           "trust_remote_code": False}},
        "21": {"class_type": "XPSRCaption", "inputs": {
            "mllm": ["20", 0], "image": ["4", 0], "high_level_instruction": INSTRUCTIONS[0],
            "low_level_instruction": INSTRUCTIONS[1], "max_new_tokens": 6, "keep_loaded": False,
            "tile_grid": ["9", 0], "whole_image_context": True}}}
    prompt["3"]["inputs"] |= {"high_level": ["21", 0], "low_level": ["21", 1], "tile_grid": ["9", 0]}
    executor, _ = H.run_ok(prompt)
    high, low = H.outputs(executor, "21")
    assert len(high) == len(low) == TILES
    tile_prompts = H.output(executor, "3", 0)[0][1]["xpsr_tile_prompts"]
    assert tile_prompts.grid.count == TILES and tile_prompts.crossattn.shape[:2] == (TILES, 1)
    assert H.output(executor, "5").shape == (1, 96, 128, 3)
