"""Per-tile prompts: XPSR Tile Grid cuts the tiles XPSR Sampler denoises, XPSR Dual Prompt Encode gives each tile its
own c_h and c_l, and the sampler's tiled path hands every tile's model call its own, refusing any other grid."""

from __future__ import annotations

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

from parity import assert_parity

LR = (24, 32)  # processed at 96 x 128 px: a 12 x 16 latent in 2 x 3 tiles of 8 latent px
SETTINGS = {"scale": 4.0, "process_size": 64, "tile_size": 8, "tile_overlap": 2}
TILES = 6
HIGH = ["a red brick wall", "a green field", "a blue sky", "a white cloud", "an old oak", "a grey road"]
LOW = ["blurry", "noisy", "sharp", "dark", "jpeg artifacts", "low contrast"]


def node(name: str):
    return getattr(H.pack_module(f"nodes.{name[0]}"), name[1])


def tile_grid(image: torch.Tensor, **settings):
    return node(("tile_grid", "XPSRTileGrid")).execute(image, **(SETTINGS | settings)).args


def encode(clip, high: list[str], low: list[str], grid=None, lowlevel_cfg: str = "official") -> tuple[list, list]:
    inputs = dict(high_level=high, low_level=low, added_prompt=["clean, high-resolution"],
                  negative_high=["blurry, dotted"], negative_low=["sharp, high resolution"], token_mode=["official"],
                  lowlevel_cfg=[lowlevel_cfg])
    return node(("prompt_encode", "XPSRDualPromptEncode")).execute(
        [clip], **inputs, **({"tile_grid": [grid]} if grid is not None else {})).args


@pytest.fixture(scope="module")
def parts():
    H.setup_host()
    model, control = node(("loader", "XPSRLoader")).execute(H.make_model(), H.XPSR_FILE, "auto").args
    return {"model": model, "control": control, "clip": H.make_clip(), "vae": H.make_vae(),
            "image": H.test_image(*LR, seed=3)}


class TileCalls:
    """What every tile's model calls received and gave, recorded at the XPSR ControlNet (c_h, c_l per row) and at
    the tiler's blend (each tile's prediction per CFG branch), in call order."""

    def __init__(self, monkeypatch):
        self.conditioning: list[dict] = []
        self.predictions: list[list[torch.Tensor]] = []
        control_class = H.pack_module("nodes.control").XPSRControlNet
        blend_class = H.pack_module("nodes.tiled_sampling").GaussianBlend
        get_control, add = control_class.get_control, blend_class.add
        recorder = self

        def recording_get_control(control, x_noisy, t, cond, batched_number, transformer_options):
            recorder.conditioning.append({"order": list(transformer_options["cond_or_uncond"]),
                                          "c_h": cond["c_crossattn"].clone(),
                                          "c_l": cond["xpsr_lowlevel"].clone()})
            return get_control(control, x_noisy, t, cond, batched_number, transformer_options)

        def recording_add(blend, boxes, predictions):
            recorder.predictions.append([p.clone() for p in predictions])
            return add(blend, boxes, predictions)

        monkeypatch.setattr(control_class, "get_control", recording_get_control)
        monkeypatch.setattr(blend_class, "add", recording_add)

    def tile_conditioning(self, call: int, branch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(c_h, c_l) of every tile in the model call ``call`` for CFG branch ``branch`` (0 positive, 1 negative)."""
        recorded = self.conditioning[call]
        rows = recorded["c_h"].shape[0] // len(recorded["order"])
        at = recorded["order"].index(branch) * rows
        return [(recorded["c_h"][at + t], recorded["c_l"][at + t]) for t in range(rows)]


def sample(parts, positive, negative, steps: int = 2, **settings) -> torch.Tensor:
    return node(("sampler", "XPSRSampler")).execute(
        parts["model"], parts["control"], positive, negative, parts["image"], parts["vae"], **(SETTINGS | settings),
        seed=7, steps=steps, cfg=4.5, sampler_name="ddpm", scheduler="xpsr_official", start="official", denoise=1.0,
        control_strength=1.0, vae_tiling="auto", color_fix="adain").args[1]["samples"]


@pytest.mark.parametrize("lr, scale, process_size, tile, overlap", [
    ((24, 32), 4.0, 64, 8, 2),      # 2 x 3 tiles, edge tiles snapped back
    ((37, 53), 4.0, 512, 16, 4),    # raised to process_size first
    ((100, 37), 3.0, 512, 24, 8),   # tall
    ((128, 96), 2.0, 256, 20, 0),   # no overlap
    ((40, 200), 4.0, 64, 32, 31),   # overlap one less than the tile
    ((64, 64), 4.0, 512, 64, 8),    # one tile: not tiled
])
def test_the_tile_grids_boxes_are_the_tiles_the_sampler_denoises(lr, scale: float, process_size: int, tile: int,
                                                                  overlap: int):
    """XPSR Tile Grid's boxes (processed-image pixels) are where the sampler's tiler cuts the latent of that image,
    and its crops are the processed image's pixels there."""
    image = H.test_image(*lr, seed=1)
    grid, crops, count = tile_grid(image, scale=scale, process_size=process_size, tile_size=tile,
                                   tile_overlap=overlap)
    processed = H.pack_module("xpsr_core.pipeline.image").upscale_for_processing(image.movedim(-1, 1), scale,
                                                                                 process_size)
    height, width = processed.shape[-2] // 8, processed.shape[-1] // 8
    latent = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).float()[None]
    seen = []

    def executor(model, conds, x_in, timestep, model_options):
        for tile in x_in:  # each tile's rows and columns, read back from the coordinates it carries
            seen.append((int(tile[0].min()) * 8, int(tile[0].max() + 1) * 8, int(tile[1].min()) * 8,
                         int(tile[1].max() + 1) * 8))
        return [x_in]

    tiler = H.pack_module("nodes.tiled_sampling").TiledCondBatch(tile, overlap, max_tiles=1)
    tiler(executor, None, [None], latent, torch.zeros(1), {})
    assert [(b.y0, b.y1, b.x0, b.x1) for b in grid.boxes] == seen
    assert count == grid.count == len(seen) and (grid.height, grid.width) == tuple(processed.shape[-2:])
    for k, box in enumerate(grid.boxes):
        assert torch.equal(crops[k], processed[0][box.slices].movedim(0, -1))


def test_every_tiles_model_calls_get_that_tiles_prompts_and_only_tile_k_follows_its_new_caption(parts, monkeypatch):
    grid, _, _ = tile_grid(parts["image"])
    assert grid.count == TILES
    calls = TileCalls(monkeypatch)
    sample(parts, *encode(parts["clip"], HIGH, LOW, grid), steps=1)
    changed_high, changed_low = list(HIGH), list(LOW)
    changed_high[4], changed_low[4] = "a yellow taxi", "overexposed"
    sample(parts, *encode(parts["clip"], changed_high, changed_low, grid), steps=1)
    first, second = calls.tile_conditioning(0, 0), calls.tile_conditioning(1, 0)
    for tile in range(TILES):
        alone = encode(parts["clip"], [HIGH[tile]], [LOW[tile]])[0]
        assert torch.equal(first[tile][0], alone[0][0][0]) and torch.equal(
            first[tile][1], alone[0][1]["model_conds"]["xpsr_lowlevel"].cond[0]), f"tile {tile} is not its prompts"
        same = tile != 4
        assert torch.equal(first[tile][0], second[tile][0]) is same and torch.equal(
            first[tile][1], second[tile][1]) is same, f"tile {tile}"
    negative = encode(parts["clip"], ["anything"], ["anything"])[1]
    for c_h, c_l in calls.tile_conditioning(0, 1) + calls.tile_conditioning(1, 1):  # official CFG: fixed negatives
        assert torch.equal(c_h, negative[0][0][0]) and torch.equal(c_l, negative[0][1]["model_conds"][
            "xpsr_lowlevel"].cond[0])
    changed = [[not torch.equal(b, a) for b, a in zip(*(p[branch].chunk(TILES) for p in calls.predictions),
                                                       strict=True)] for branch in range(2)]
    assert changed == [[t == 4 for t in range(TILES)], [False] * TILES]  # the negative branch's prompts are fixed


def test_in_the_papers_cfg_the_negative_branch_keeps_each_tiles_low_level_prompt(parts, monkeypatch):
    grid, _, _ = tile_grid(parts["image"])
    calls = TileCalls(monkeypatch)
    sample(parts, *encode(parts["clip"], HIGH, LOW, grid, lowlevel_cfg="paper"), steps=1)
    for tile, (c_h, c_l) in enumerate(calls.tile_conditioning(0, 1)):
        alone = encode(parts["clip"], [HIGH[tile]], [LOW[tile]], lowlevel_cfg="paper")[1]
        assert torch.equal(c_h, alone[0][0][0]) and torch.equal(c_l, alone[0][1]["model_conds"][
            "xpsr_lowlevel"].cond[0])


def test_the_same_caption_for_every_tile_gives_what_one_caption_gives(parts):
    grid, _, _ = tile_grid(parts["image"])
    whole = sample(parts, *encode(parts["clip"], [HIGH[0]], [LOW[0]]))
    per_tile = sample(parts, *encode(parts["clip"], [HIGH[0]] * TILES, [LOW[0]] * TILES, grid))
    single = sample(parts, *encode(parts["clip"], [HIGH[0]], [LOW[0]], grid))
    assert_parity(per_tile, whole, "per-tile prompts all equal to the whole-image prompt")
    assert torch.equal(single, whole)  # one prompt with a grid is the same for every tile


def test_per_tile_prompts_for_another_grid_are_refused_before_sampling(parts, monkeypatch):
    grid, _, _ = tile_grid(parts["image"], tile_size=12)
    positive, negative = encode(parts["clip"], HIGH[:2], LOW[:2], grid)
    calls = TileCalls(monkeypatch)
    with pytest.raises(ValueError) as refused:
        sample(parts, positive, negative)
    assert str(refused.value) == (
        "positive conditioning has per-tile prompts for 2x1 tiles of 96 px over a 128x96 px processed image "
        "(tile_size 12, tile_overlap 2 latent px), but XPSR Sampler will denoise 3x2 tiles of 64 px over a 128x96 px "
        "processed image (tile_size 8, tile_overlap 2 latent px); give XPSR Tile Grid the sampler's scale, "
        "process_size, tile_size and tile_overlap")
    assert calls.conditioning == []
    with pytest.raises(ValueError, match="will denoise one tile, the whole 128x96 px processed image"):
        sample(parts, positive, negative, tile_size=64)


def test_per_tile_prompt_lists_must_hold_one_prompt_or_one_per_tile(parts):
    grid, _, _ = tile_grid(parts["image"])
    with pytest.raises(ValueError, match=r"high_level has 4 prompts; with tile_grid \(3x2 tiles of 64 px .* expected "
                                         r"1 or 6: one for all tiles or one per tile"):
        encode(parts["clip"], HIGH[:4], LOW, grid)
    batch_grid, _, _ = tile_grid(H.test_image(*LR, batch=2))
    with pytest.raises(ValueError, match=r"low_level has 6 prompts; .* 2 image\(s\)\) expected 1 or 12"):
        encode(parts["clip"], HIGH * 2, LOW, batch_grid)


def test_xpsr_apply_refuses_per_tile_prompts_that_comfyuis_samplers_would_give_tile_0(parts):
    grid, _, _ = tile_grid(parts["image"])
    positive, negative = encode(parts["clip"], HIGH, LOW, grid)
    with pytest.raises(ValueError, match="positive conditioning has per-tile prompts .* XPSR Apply would give every "
                                         "tile the first tile's prompts"):
        node(("apply", "XPSRApply")).execute(positive, negative, parts["control"], parts["image"], 1.0, 0.0, 1.0)


def test_typed_per_tile_prompts_one_per_line_sample_through_comfyuis_executor(parts):
    """XPSR Prompt Lines -> Dual Prompt Encode (tile_grid from XPSR Tile Grid) -> XPSR Sampler, as a graph, gives
    what the nodes give called directly."""
    prompt = H.graph(height=LR[0], width=LR[1], seed=7, steps=2, **SETTINGS)
    prompt |= {"9": {"class_type": "XPSRTileGrid", "inputs": SETTINGS | {"image": ["4", 0]}},
               "10": {"class_type": "XPSRPromptLines", "inputs": {"text": "\n".join(HIGH)}},
               "11": {"class_type": "XPSRPromptLines", "inputs": {"text": "\n".join(LOW)}}}
    prompt["3"]["inputs"] |= {"high_level": ["10", 0], "low_level": ["11", 0], "tile_grid": ["9", 0],
                              "negative_high": "blurry, dotted", "negative_low": "sharp, high resolution"}
    executor, _ = H.run_ok(prompt)
    assert H.outputs(executor, "10")[1] == [TILES] and H.outputs(executor, "9")[2] == [TILES]
    image = H.test_image(*LR)
    grid, _, _ = tile_grid(image)
    expected = sample(parts | {"image": image}, *encode(parts["clip"], HIGH, LOW, grid))
    assert_parity(H.output(executor, "5", 1)["samples"], expected, "the graph's latent")


def test_prompt_lines_are_the_lines_typed():
    lines = node(("prompt_lines", "XPSRPromptLines"))
    assert lines.execute("a cat\n\nblurry, noisy\n").args == (["a cat", "", "blurry, noisy"], 3)
    with pytest.raises(ValueError, match="text is empty; expected one prompt per line"):
        lines.execute("")


def test_with_an_image_batch_each_images_tiles_get_that_images_prompts(parts, monkeypatch):
    """Lists hold every image's tiles, image by image (prompt b * tiles + t: image b's tile t); the tiles of one model
    call are stacked tile-major (row t * images + b)."""
    images = H.test_image(*LR, batch=2, seed=3)
    grid, _, _ = tile_grid(images)
    high = [f"{text}, seen in photo {b}" for b in range(2) for text in HIGH]
    low = [f"{text} {b}" for b in range(2) for text in LOW]
    calls = TileCalls(monkeypatch)
    sample(parts | {"image": images}, *encode(parts["clip"], high, low, grid), steps=1)
    rows = calls.tile_conditioning(0, 0)
    assert len(rows) == 2 * TILES
    for tile in range(TILES):
        for b in range(2):
            alone = encode(parts["clip"], [high[b * TILES + tile]], [low[b * TILES + tile]])[0]
            c_h, c_l = rows[tile * 2 + b]
            assert torch.equal(c_h, alone[0][0][0]) and torch.equal(
                c_l, alone[0][1]["model_conds"]["xpsr_lowlevel"].cond[0]), f"image {b}, tile {tile}"
