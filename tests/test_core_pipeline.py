"""The official pipeline's pieces outside the models: schedule, start latent, sizes, tiles, colour fix, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from e2e_oracle import assert_image_close, e2e_fixture
from xpsr_core.pipeline.color import adain_color_fix, color_fix, wavelet_color_fix
from xpsr_core.pipeline.image import processing_steps, resize, to_rgb, upscale_for_processing
from xpsr_core.pipeline.prompts import high_level_prompt
from xpsr_core.pipeline.schedule import (
    alpha_cumprod_at,
    noise_to_level,
    official_start,
    official_timesteps,
    official_timesteps_at_denoise,
    ve_start_latent,
    vp_to_ve,
)
from xpsr_core.pipeline.tiling import (
    Box,
    GaussianBlend,
    gaussian_weights,
    needs_tiling,
    processing_tile_grid,
    stack_tiles,
    tile_boxes,
)


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_official_timesteps_use_leading_spacing_with_offset_one():
    assert official_timesteps(20) == list(range(951, 0, -50))
    assert official_timesteps(50) == list(range(981, 0, -20))
    assert official_timesteps(4) == [751, 501, 251, 1]


def test_denoise_runs_the_end_of_a_longer_official_schedule_as_ksampler_does():
    assert official_timesteps_at_denoise(20, 1.0) == list(range(951, 0, -50))
    assert official_timesteps_at_denoise(20, 0.99995) == list(range(951, 0, -50))
    assert official_timesteps_at_denoise(10, 0.5) == list(range(451, 0, -50))
    assert official_timesteps_at_denoise(4, 0.3) == [229, 153, 77, 1]  # int(4 / 0.3) = 13 steps of 76
    assert official_timesteps_at_denoise(3, 0.7) == [501, 251, 1]
    with pytest.raises(ValueError, match="steps is 2000; expected 1 to 1000"):
        official_timesteps_at_denoise(1000, 0.5)


def test_comfyui_sigmas_convert_to_the_official_alphas_cumprod_and_vp_latents_to_ve():
    acp = sd15_alphas_cumprod()
    sigmas = ((1 - acp) / acp).sqrt()
    for t in (1, 251, 800, 951):
        assert alpha_cumprod_at(float(sigmas[t])) == pytest.approx(float(acp[t]), rel=1e-12)
    x0, noise = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    vp = noise_to_level(x0, noise, float(acp[501]))
    torch.testing.assert_close(vp_to_ve(vp, float(sigmas[501])), x0 + sigmas[501] * noise)


def test_official_start_in_sigma_space_is_the_vp_start_scaled_as_the_node_scaled_it():
    acp = sd15_alphas_cumprod()
    sigmas = ((1 - acp) / acp).sqrt().float()
    sigma, added_sigma = float(sigmas[951]), float(sigmas[800])
    lr = torch.randn(2, 4, 8, 8)
    start = ve_start_latent("official", lr, sigma, added_sigma, torch.Generator().manual_seed(3))
    before_the_move = official_start(lr, 1 / (1 + sigma ** 2), 1 / (1 + added_sigma ** 2),
                                     torch.Generator().manual_seed(3)) * (1 + sigma ** 2) ** 0.5
    assert torch.equal(start, before_the_move)
    vp = official_start(lr, float(acp[951]), float(acp[800]), torch.Generator().manual_seed(3))
    torch.testing.assert_close(start / (1 + sigma ** 2) ** 0.5, vp)  # what ComfyUI's calculate_input hands the model


def test_noise_start_in_sigma_space_is_unit_noise_scaled_to_the_first_sigma():
    start = ve_start_latent("noise", torch.zeros(1, 4, 6, 5), 14.6, 5.2, torch.Generator().manual_seed(9))
    expected = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(9)) * (1 + 14.6 ** 2) ** 0.5
    assert torch.equal(start, expected)
    with pytest.raises(ValueError, match="start is 'img2img'; expected one of"):
        ve_start_latent("img2img", torch.zeros(1, 4, 6, 5), 14.6, 5.2, torch.Generator())


def test_official_start_noises_twice_and_keeps_about_1_7_percent_of_the_lr_latent():
    acp = sd15_alphas_cumprod()
    lr = torch.randn(2, 4, 8, 8)
    start = official_start(lr, float(acp[951]), float(acp[800]), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    first, added = torch.randn(lr.shape, generator=g), torch.randn(lr.shape, generator=g)
    expected = noise_to_level(noise_to_level(lr, first, float(acp[951])), added, float(acp[800]))
    torch.testing.assert_close(start, expected)
    assert float((acp[951] * acp[800]).sqrt()) == pytest.approx(0.0173, abs=5e-4)


def test_processing_sizes_follow_the_official_resizes():
    assert processing_steps(37, 53, 4, 512) == [(148, 212, "bicubic"), (512, 733, "bilinear"), (512, 728, "bicubic")]
    assert processing_steps(128, 128, 4, 512) == [(512, 512, "bicubic"), (512, 512, "bicubic")]
    assert processing_steps(300, 130, 4, 512) == [(1200, 520, "bicubic"), (1200, 520, "bicubic")]
    out = upscale_for_processing(torch.rand(1, 3, 37, 53), 4, 512)
    assert out.shape == (1, 3, 512, 728)


def _photo_and_edges() -> list[np.ndarray]:
    """A real photo and a one-pixel checkerboard: the edges where bicubic overshoots most."""
    checker = (np.indices((40, 56)).sum(0) % 2 * 255).astype(np.uint8)
    return [data.astronaut()[::4, ::4], np.stack([checker, 255 - checker, checker], -1)]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("factor", [(3.01, 2.02), (0.66, 0.75)], ids=["up", "down"])
def test_resize_matches_pil_on_8bit_images(mode, factor):
    """PIL clips its horizontal pass to 8 bits before the vertical one; only its rounding may differ (1/255)."""
    for image in _photo_and_edges():
        size = (round(image.shape[0] * factor[0]), round(image.shape[1] * factor[1]))
        pil_mode = Image.BICUBIC if mode == "bicubic" else Image.BILINEAR
        reference = np.asarray(Image.fromarray(image).resize(size[::-1], pil_mode), dtype=np.float32) / 255
        ours = resize(torch.from_numpy(image / np.float32(255)).permute(2, 0, 1)[None], *size, mode)
        assert np.abs(ours[0].permute(1, 2, 0).numpy() - reference).max() <= 1.1 / 255


@pytest.mark.parametrize("name", e2e_fixture().case_names)
def test_processing_image_matches_the_official_scripts(name):
    """The official script rounds to 8 bits after each of its three resizes; a float pipeline differs by that."""
    case = e2e_fixture().case(name)
    ours = upscale_for_processing(case.image("lr"), case.settings["upscale"], case.settings["process_size"])
    assert list(ours.shape[-2:][::-1]) == case.settings["processing_size"]
    assert_image_close(ours, case.image("processing"), "processing image", max_diff=2 / 255, mean_diff=0.5 / 255)


def test_to_rgb_drops_alpha_and_expands_gray():
    assert to_rgb(torch.rand(2, 5, 6, 4)).shape == (2, 5, 6, 3)
    gray = torch.rand(1, 5, 6, 1)
    assert torch.equal(to_rgb(gray)[..., 2], gray[..., 0])
    with pytest.raises(ValueError, match="image has 5 channels; expected 1"):
        to_rgb(torch.rand(1, 5, 6, 5))


def test_tiles_cover_the_latent_with_the_official_grid():
    boxes = tile_boxes(100, 70, 32, 8)
    assert {(b.y1 - b.y0, b.x1 - b.x0) for b in boxes} == {(32, 32)}
    assert sorted({b.x0 for b in boxes}) == [0, 24, 38] and sorted({b.y0 for b in boxes}) == [0, 24, 48, 68]
    covered = torch.zeros(100, 70)
    for b in boxes:
        covered[b.y0:b.y1, b.x0:b.x1] += 1
    assert covered.min() >= 1
    assert tile_boxes(20, 50, 32, 8)[0].y1 == 20  # tile shrinks to the short side
    assert needs_tiling(321, 320, 320) and not needs_tiling(320, 320, 320)


def test_the_tile_grid_is_the_latent_grid_in_processed_image_pixels_column_by_column():
    grid = processing_tile_grid(100, 75, 2.5, 128, 16, 4)  # 250 x 187 -> processed 250 x 184, latent 31 x 23
    assert (grid.height, grid.width, grid.count) == (248, 184, 6)
    assert grid.boxes == tuple(b.scaled(8) for b in tile_boxes(31, 23, 16, 4))
    assert [(b.y0, b.x0) for b in grid.boxes] == [(0, 0), (96, 0), (120, 0), (0, 56), (96, 56), (120, 56)]
    assert grid.describe() == ("2x3 tiles of 128 px over a 184x248 px processed image (tile_size 16, tile_overlap 4 "
                               "latent px)")
    whole = processing_tile_grid(100, 75, 2.5, 128, 320, 8)
    assert whole.boxes == (Box(0, 248, 0, 184),) and whole.describe() == (
        "one tile, the whole 184x248 px processed image (tile_size 320 latent px)")
    assert whole.same_tiles(processing_tile_grid(100, 75, 2.5, 128, 64, 8))  # 31 x 23 < 64^2: not tiled either
    assert not grid.same_tiles(processing_tile_grid(100, 75, 2.5, 128, 16, 2))


def test_gaussian_weights_keep_the_official_asymmetric_centre():
    w = gaussian_weights(10)
    assert w.sum(1).argmax().item() == 5  # centre T/2 down
    assert torch.allclose(w[:, 4], w[:, 5])  # centre (T-1)/2 across
    assert torch.allclose(w[4], w[6]) and not torch.allclose(w[4], w[5])


def test_box_slices_index_the_tile_in_the_last_two_dimensions():
    x = torch.arange(2 * 3 * 10 * 12.0).reshape(2, 3, 10, 12)
    box = Box(2, 6, 5, 9)
    assert torch.equal(x[box.slices], x[:, :, 2:6, 5:9])
    assert torch.equal(x[0, 0][box.scaled(2).slices], x[0, 0, 4:12, 10:18])


def test_stacked_tiles_are_tile_major():
    x = torch.randn(2, 4, 20, 30)
    boxes = tile_boxes(20, 30, 16, 4)[:2]
    stacked = stack_tiles(x, boxes)
    assert stacked.shape == (4, 4, 16, 16)
    assert torch.equal(stacked[2 + 1], x[1][boxes[1].slices])  # row i * B + b: image b's tile i


def blend_before_the_move(x_in: torch.Tensor, groups: list[tuple], results: list[list[torch.Tensor]]) -> list:
    """The blending loop TiledCondBatch ran before it moved to the core, written out as the reference."""
    boxes = groups[0]
    weights = gaussian_weights(boxes[0].y1 - boxes[0].y0).to(x_in)
    outputs = [torch.zeros_like(x_in) for _ in results[0]]
    total = torch.zeros(x_in.shape[-2:], dtype=x_in.dtype, device=x_in.device)
    for group, group_results in zip(groups, results, strict=True):
        for out, result in zip(outputs, group_results, strict=True):
            for box, tile_result in zip(group, result.chunk(len(group)), strict=True):
                out[..., box.y0:box.y1, box.x0:box.x1] += tile_result * weights
        for box in group:
            total[..., box.y0:box.y1, box.x0:box.x1] += weights
    return [out / total for out in outputs]


def test_gaussian_blend_equals_the_node_loop_it_replaces():
    generator = torch.Generator().manual_seed(4)
    x_in = torch.randn(2, 4, 40, 30, generator=generator)
    boxes = tile_boxes(40, 30, 16, 4)
    groups = [tuple(boxes[i:i + 4]) for i in range(0, len(boxes), 4)]
    assert len(groups[-1]) < 4
    results = [[torch.randn(len(g) * 2, 4, 16, 16, generator=generator) for _ in range(2)] for g in groups]
    blend = GaussianBlend(x_in, 2, 16)
    for group, group_results in zip(groups, results, strict=True):
        blend.add(group, group_results)
    for ours, reference in zip(blend.result(), blend_before_the_move(x_in, groups, results), strict=True):
        assert torch.equal(ours, reference)


def test_gaussian_blend_of_tiles_cut_from_one_latent_gives_that_latent_back():
    x = torch.randn(1, 4, 50, 37, dtype=torch.float64)
    boxes = tile_boxes(50, 37, 20, 6)
    blend = GaussianBlend(x, 1, 20)
    blend.add(boxes, [stack_tiles(x, boxes)])
    torch.testing.assert_close(blend.result()[0], x)


def test_adain_gives_the_reference_channel_statistics():
    image, reference = torch.rand(1, 3, 32, 32) * 0.5, torch.rand(1, 3, 32, 32) * 0.2 + 0.4
    fixed = adain_color_fix(image, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-3, rtol=0)


def test_wavelet_keeps_detail_and_takes_the_reference_colour():
    detail = torch.rand(1, 3, 64, 64) * 0.1
    shifted = (detail + torch.tensor([0.6, 0.2, 0.3])[None, :, None, None]).clamp(0, 1)
    reference = torch.full((1, 3, 64, 64), 0.45)
    fixed = wavelet_color_fix(shifted, reference)
    assert (fixed.mean((2, 3)) - 0.45).abs().max() < 0.01
    kept = torch.corrcoef(torch.stack([fixed.flatten(), detail.flatten()]))[0, 1]
    assert kept > 0.5
    assert torch.equal(color_fix(shifted, reference, "none"), shifted)
    with pytest.raises(ValueError, match="colour fix is 'lab'"):
        color_fix(shifted, reference, "lab")


def test_high_level_prompt_appends_the_added_prompt():
    assert high_level_prompt(" a cat on a mat\n", "clean, 8k.") == "a cat on a mat clean, 8k."
    assert high_level_prompt("", "clean") == "clean"
