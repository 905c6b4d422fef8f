"""Real-ESRGAN's second-order degradation and the pair maker, as XPSR's make_train.py runs them.

The full pipeline is random; to see one effect at a time the tests use ``quiet()``: every
stage at its identity (no resize, zero noise, JPEG at quality 100, no second blur, no sinc, a
first-stage Gaussian of sigma 0.2, which is a pulse to 1e-5), with one setting turned up.
Because every draw happens whatever its value, the same seed under two such configs takes the
same path, so the difference of the two outputs is the effect of that one setting.
"""

from __future__ import annotations

import importlib.util
import io
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xpsr_core.training.degradation import (
    KERNEL_TYPES,
    DegradationConfig,
    KernelConfig,
    add_gaussian_noise,
    add_poisson_noise,
    blur_kernel,
    degrade,
    filter2d,
    jpeg,
    make_pair,
    minimum_size,
    random_kernel,
    sinc_kernel,
    usm_sharp,
)
from xpsr_core.training.make_pairs import main

ROOT = Path(__file__).resolve().parents[1]
ONLY_ISO = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def texture(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth coloured shapes with fine gray detail on top (as in photos, detail is mostly luma, which JPEG keeps at
    full resolution), away from 0 and 1 so noise is rarely clipped."""
    g = gen(seed)
    coarse = F.interpolate(torch.rand(batch, 3, height // 20, width // 20, generator=g), size=(height, width),
                           mode="bicubic", align_corners=False)
    fine = torch.rand(batch, 1, height, width, generator=g) - 0.5
    return (0.2 + 0.5 * coarse + 0.1 * fine).clamp(0, 1)


def quiet(**changes: object) -> DegradationConfig:
    identity = dict(
        kernel1=KernelConfig(kernel_prob=ONLY_ISO, sinc_prob=0.0, blur_sigma=(0.2, 0.2)),
        final_sinc_prob=0.0,
        resize_prob=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0, noise_range=(0.0, 0.0), jpeg_range=(100.0, 100.0),
        second_blur_prob=0.0,
        resize_prob2=(0.0, 0.0, 1.0), gaussian_noise_prob2=1.0, noise_range2=(0.0, 0.0), jpeg_range2=(100.0, 100.0),
    )
    return DegradationConfig(**{**identity, **changes})


def high_frequency_energy(x: torch.Tensor) -> float:
    laplacian = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return float(laplacian.pow(2).mean())


def blockiness(x: torch.Tensor) -> float:
    """Mean jump across the 8x8 JPEG block borders over the mean jump at other odd offsets, for square images.

    About 1 without blocks. Odd offsets only, since 4:2:0 chroma pairs pixels and so favours odd offsets anyway.
    """
    jumps = ((x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1, 2))
             + (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1, 3)))
    j = torch.arange(jumps.numel())  # jump j is between pixels j and j + 1
    return float(jumps[j % 8 == 7].mean() / jumps[(j % 2 == 1) & (j % 8 != 7)].mean())


# --- the pipeline ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4, 2])
def test_degrade_gives_the_hr_size_over_the_scale_in_8bit_levels(scale):
    hr = texture(2, 128, 96)
    lr = degrade(hr, DegradationConfig(scale=scale), gen(0))
    assert lr.shape == (2, 3, 128 // scale, 96 // scale)
    assert lr.dtype == torch.float32
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    torch.testing.assert_close(lr * 255, (lr * 255).round(), rtol=0, atol=1e-4)


def test_degrade_is_reproducible_for_a_seed_differs_across_seeds_and_leaves_global_rng_alone():
    hr = texture(2, 128, 128)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = degrade(hr, DegradationConfig(), gen(7))
    assert torch.equal(first, degrade(hr, DegradationConfig(), gen(7)))
    assert not torch.equal(first, degrade(hr, DegradationConfig(), gen(8)))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_degrade_refuses_sizes_the_official_pipeline_cannot_take():
    assert minimum_size(DegradationConfig()) == 76  # int(76 * 0.15) = 11 > 10, the 21-tap kernel's half width
    with pytest.raises(ValueError, match=r"HR batch is 72x128 \(height x width\); expected sides that are multiples "
                                         r"of the scale 4 and at least 76"):
        degrade(texture(1, 72, 128), DegradationConfig(), gen(0))
    with pytest.raises(ValueError, match="multiples of the scale 4"):
        degrade(texture(1, 130, 128), DegradationConfig(), gen(0))
    with pytest.raises(ValueError, match=r"HR batch is \(3, 128, 128\)"):
        degrade(texture(1, 128, 128)[0], DegradationConfig(), gen(0))


def test_degrade_adds_noise_of_the_configured_sigma():
    hr = texture(2, 128, 128)
    clean = degrade(hr, quiet(gray_noise_prob2=1.0), gen(3))
    noisy = degrade(hr, quiet(gray_noise_prob2=1.0, noise_range2=(20.0, 20.0)), gen(3))
    residual = (noisy - clean) * 255
    assert 0.9 * 20 < float(residual.std()) < 1.1 * 20
    # gray noise: the same in every channel, up to JPEG rounding (colour noise would differ by ~8 levels here)
    assert float((residual[:, 0] - residual[:, 2]).abs().mean()) < 1


def test_degrade_leaves_jpeg_blocks_on_the_lr_grid():
    hr = texture(2, 384, 384)
    at_100 = blockiness(degrade(hr, quiet(), gen(1)))
    at_30 = blockiness(degrade(hr, quiet(jpeg_range2=(30.0, 30.0)), gen(1)))
    assert at_100 < 1.1
    assert at_30 > 1.3


def test_degrade_blurs_with_the_first_kernel():
    hr = texture(2, 128, 128)
    sharp = degrade(hr, quiet(), gen(2))
    blurred = degrade(hr, quiet(kernel1=KernelConfig(kernel_prob=ONLY_ISO, sinc_prob=0.0, blur_sigma=(3.0, 3.0))),
                      gen(2))
    assert high_frequency_energy(blurred) < 0.5 * high_frequency_energy(sharp)


def test_quiet_config_is_a_plain_downscale():
    """Guards the pipeline tests: with every stage at identity, degrade only resizes, rounds and loses JPEG's
    subsampled chroma, so the luma is a plain downscale's."""
    hr = texture(1, 128, 128)
    lr = degrade(hr, quiet(), gen(0))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    errors = []
    for mode in ("area", "bilinear", "bicubic"):
        plain = F.interpolate(hr, size=(32, 32), mode=mode, **({} if mode == "area" else {"align_corners": False}))
        errors.append(float(((lr - plain) * luma).sum(1).abs().mean()) * 255)
    assert min(errors) < 1


# --- kernels -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 21])
@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_each_kernel_type_is_normalised_centred_and_of_the_requested_size(kind, size):
    kernel = blur_kernel(kind, size, sigma_x=1.5, sigma_y=0.7, theta=0.4, beta=1.7)
    assert kernel.shape == (size, size)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(kernel.min()) >= 0
    assert int(kernel.argmax()) == (size * size) // 2
    torch.testing.assert_close(kernel, kernel.flip(0, 1))  # point-symmetric: correlation = convolution
    if "aniso" not in kind:
        torch.testing.assert_close(kernel, kernel.T)


@pytest.mark.parametrize("size", [7, 13, 21])
def test_sinc_kernel_is_normalised_of_the_requested_size_and_low_pass(size):
    cutoff = math.pi / 2
    kernel = sinc_kernel(cutoff, size)
    assert kernel.shape == (size, size)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(kernel[size // 2, size // 2]) == float(kernel.max())
    response = torch.fft.fft2(F.pad(kernel, [(64 - size) // 2, (64 - size) // 2 + 1] * 2)).abs()
    w = torch.fft.fftfreq(64, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(w[:, None] ** 2 + w[None, :] ** 2)
    assert float(response[radius < 0.6 * cutoff].mean()) > 0.9
    assert float(response[(radius > 1.5 * cutoff) & (radius < math.pi)].mean()) < 0.15


def test_kernel_formulas_follow_basicsr():
    # anisotropic: sigma_x along the axis rotated by theta
    torch.testing.assert_close(blur_kernel("aniso", 21, 3.0, 1.0, math.pi / 2), blur_kernel("aniso", 21, 3.0, 1.0).T)
    wide = blur_kernel("aniso", 21, 3.0, 1.0)
    assert float(wide[10, 13]) > float(wide[13, 10])  # wider along x (columns)
    # generalized Gaussian with beta 1 is the Gaussian; plateau is 1 / (1 + q^beta), q = r^2 / sigma^2
    torch.testing.assert_close(blur_kernel("generalized_iso", 9, 1.3, beta=1.0), blur_kernel("iso", 9, 1.3))
    plateau = blur_kernel("plateau_iso", 9, 2.0, beta=1.5)
    assert float(plateau[4, 6] / plateau[4, 4]) == pytest.approx(1 / (1 + (4 / 4) ** 1.5))
    gaussian = blur_kernel("iso", 9, 2.0)
    assert float(gaussian[4, 6] / gaussian[4, 4]) == pytest.approx(math.exp(-0.5 * 4 / 4))
    # sinc: cutoff J1(cutoff r) / (2 pi r) against the centre's cutoff^2 / (4 pi); J1(1) = 0.4400505857
    sinc = sinc_kernel(1.0, 11)
    assert float(sinc[5, 6] / sinc[5, 5]) == pytest.approx(0.4400505857 / (2 * math.pi) / (1 / (4 * math.pi)),
                                                           rel=1e-6)


def test_random_kernels_come_in_every_official_size_normalised():
    config = DegradationConfig()
    g = gen(0)
    kernels = [random_kernel(config.kernel1, config.kernel_sizes, g) for _ in range(200)]
    assert {k.shape[0] for k in kernels} == set(range(7, 22, 2))
    assert all(k.shape[0] == k.shape[1] for k in kernels)
    assert max(abs(float(k.sum()) - 1) for k in kernels) < 1e-12
    negative = sum(float(k.min()) < -1e-6 for k in kernels)  # only sinc kernels have negative lobes
    assert 5 <= negative <= 40  # sinc_prob 0.1, not every sinc kernel reaches its first negative lobe


def test_random_anisotropic_kernels_are_stretched_and_rotated():
    only_aniso = KernelConfig(kernel_prob=(0.0, 1.0, 0.0, 0.0, 0.0, 0.0), sinc_prob=0.0)
    for seed in range(5):
        kernel = random_kernel(only_aniso, (21,), gen(seed))
        assert not torch.allclose(kernel, kernel.T)  # symmetric only if unstretched or at a multiple of 45 degrees


def test_kernel_config_needs_one_probability_per_type():
    with pytest.raises(ValueError, match="kernel_prob has 2 entries; expected one per kernel type"):
        KernelConfig(kernel_prob=(0.5, 0.5))
    with pytest.raises(ValueError, match="kernel size 8 is even"):
        blur_kernel("iso", 8, 1.0)
    with pytest.raises(ValueError, match="kernel type 'box' is unknown"):
        blur_kernel("box", 7, 1.0)


def test_filter2d_blurs_each_image_with_its_own_kernel():
    image = texture(2, 64, 64)
    out = filter2d(image, [torch.ones(1, 1, dtype=torch.float64), blur_kernel("iso", 21, 2.0)])
    assert torch.equal(out[0], image[0])  # the pulse kernel changes nothing
    assert high_frequency_energy(out[1]) < 0.1 * high_frequency_energy(image[1])
    assert float(out[1].mean()) == pytest.approx(float(image[1].mean()), abs=2e-3)  # sum-1 kernels keep brightness


# --- noise, JPEG, sharpening -------------------------------------------------------------------------------------


def test_gaussian_noise_has_the_drawn_sigma_and_gray_noise_is_shared_by_channels():
    flat = torch.full((2, 3, 96, 96), 0.5)
    color = add_gaussian_noise(flat, (20.0, 20.0), 0.0, gen(0)) - flat
    gray = add_gaussian_noise(flat, (20.0, 20.0), 1.0, gen(0)) - flat
    assert float(color.std() * 255) == pytest.approx(20, rel=0.03)
    assert float(gray.std() * 255) == pytest.approx(20, rel=0.03)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert float((color[:, 0] - color[:, 1]).abs().mean()) > 0.01


def test_poisson_noise_follows_the_counted_levels():
    ramp = torch.linspace(0.2, 0.8, 96 * 96).view(1, 1, 96, 96).expand(2, 3, 96, 96).contiguous()
    levels = len(torch.unique((ramp[0] * 255).round()))
    vals = 2 ** math.ceil(math.log2(levels))  # 154 levels -> 256 photons per unit
    for scale in (1.0, 2.5):
        residual = add_poisson_noise(ramp, (scale, scale), 0.0, gen(0)) - ramp
        expected = scale * math.sqrt(float((ramp * 255).round().mean() / 255) / vals)
        assert float(residual.std()) == pytest.approx(expected, rel=0.05)
    gray = add_poisson_noise(ramp, (1.0, 1.0), 1.0, gen(0)) - ramp
    torch.testing.assert_close(gray[:, 0] - gray[:, 2], torch.zeros_like(gray[:, 0]), rtol=0, atol=1e-6)


def test_jpeg_is_pillows_round_trip_at_each_quality():
    image = texture(2, 64, 80)
    out = jpeg(image, [30, 90])
    for i, quality in enumerate([30, 90]):
        pixels = (image[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        expected = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255
        assert torch.equal(out[i], expected)
    error = (out - image).abs().mean(dim=(1, 2, 3))
    assert float(error[0]) > 1.5 * float(error[1]) > 0


def test_usm_sharpens_edges_and_leaves_flat_areas():
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(usm_sharp(flat), flat)
    step = torch.full((1, 3, 64, 256), 0.3)
    step[..., 128:] = 0.7
    sharp = usm_sharp(step)
    assert float(sharp[..., 120:128].min()) < 0.29 and float(sharp[..., 128:136].max()) > 0.71  # overshoot
    assert float((sharp[..., :40] - step[..., :40]).abs().max()) < 1e-3  # beyond the 51-tap blur: untouched
    assert float(sharp.min()) >= 0 and float(sharp.max()) <= 1


# --- pairs -------------------------------------------------------------------------------------------------------


def test_make_pair_saves_the_sharpened_crop_as_hr_and_an_lr_of_the_same_size():
    image = texture(1, 96, 96)[0]
    flips = set()
    for seed in range(4):
        hr, lr = make_pair(image, 96, DegradationConfig(), gen(seed))
        assert hr.shape == lr.shape == (3, 96, 96)
        assert float(lr.min()) >= 0 and float(lr.max()) <= 1
        if torch.equal(hr, usm_sharp(image[None])[0]):
            flips.add(False)
        else:
            torch.testing.assert_close(hr, usm_sharp(image.flip(-1)[None])[0])
            flips.add(True)
    assert flips == {False, True}  # horizontal flip on, as the official dataset options say


def test_make_pair_refuses_an_image_smaller_than_the_crop():
    with pytest.raises(ValueError, match=r"image is 100x90 \(width x height\); expected at least 128x128"):
        make_pair(texture(1, 90, 100)[0], 128, DegradationConfig(), gen(0))


# --- the command line --------------------------------------------------------------------------------------------


def skimage_photos() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-image (a test extra) is not installed; its bundled photos are the test images")
    return Path(spec.origin).parent / "data"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three real photos as shipped with scikit-image: 512x512, 600x400 and 451x300 (width x height)."""
    data = skimage_photos()
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(data / "astronaut.png", folder / "astronaut.png")
    shutil.copy(data / "chelsea.png", folder / "chelsea.png")
    Image.open(data / "coffee.png").save(folder / "coffee.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def test_cli_writes_the_official_layout_reproducibly_from_real_photos(photos, tmp_path, capsys):
    out = tmp_path / "set"
    code, stdout, _ = run(capsys, "--hr", photos, "--out", out, "--size", 96, "--seed", 5, "--per-image", 2)
    assert code == 0 and "wrote 6 pairs" in stdout
    names = sorted(p.name for p in (out / "HR").iterdir())
    assert names == [f"{stem}_{k}.png" for stem in ("astronaut", "chelsea", "coffee") for k in (0, 1)]
    assert sorted(p.name for p in (out / "LR").iterdir()) == names
    hr = {n: np.asarray(Image.open(out / "HR" / n)) for n in names}
    lr = {n: np.asarray(Image.open(out / "LR" / n)) for n in names}
    assert all(a.shape == (96, 96, 3) and a.dtype == np.uint8 for a in [*hr.values(), *lr.values()])
    # each LR is its own HR degraded: aligned with it, and unlike the other crops
    for n in names:
        assert 15 < psnr(hr[n], lr[n]) < 40
        assert psnr(hr[n], lr[n]) > max(psnr(hr[m], lr[n]) for m in names if m != n)

    again = tmp_path / "again"
    assert run(capsys, "--hr", photos, "--out", again, "--size", 96, "--seed", 5, "--per-image", 2)[0] == 0
    assert all((again / d / n).read_bytes() == (out / d / n).read_bytes() for d in ("HR", "LR") for n in names)
    other = tmp_path / "other"
    assert run(capsys, "--hr", photos, "--out", other, "--size", 96, "--seed", 6, "--per-image", 2)[0] == 0
    assert all((other / "LR" / n).read_bytes() != (out / "LR" / n).read_bytes() for n in names)


def test_cli_runs_as_a_module(photos, tmp_path):
    (photos / "chelsea.png").unlink()
    (photos / "coffee.jpg").unlink()
    out = tmp_path / "set"
    result = subprocess.run([sys.executable, "-m", "xpsr_core.training.make_pairs", "--hr", str(photos), "--out",
                             str(out), "--size", "96"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Image.open(out / "HR" / "astronaut.png").size == (96, 96)
    assert Image.open(out / "LR" / "astronaut.png").size == (96, 96)


def test_cli_names_the_input_and_the_expectation_when_it_refuses(photos, tmp_path, capsys):
    out = tmp_path / "set"
    missing = tmp_path / "nowhere"
    code, _, err = run(capsys, "--hr", missing, "--out", out)
    assert code == 2
    assert f"HR folder {missing} does not exist; expected a folder of HR images" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("")
    code, _, err = run(capsys, "--hr", empty, "--out", out)
    assert code == 2
    assert f"HR folder {empty} has no images; expected files ending in .bmp, .jpeg, .jpg, .png" in err

    code, _, err = run(capsys, "--hr", photos, "--out", out)  # chelsea is 451x300, the official crop is 512
    assert code == 2
    assert f"HR image {photos / 'chelsea.png'} is 451x300 (width x height); expected at least 512x512" in err
    assert not out.exists()  # refused before anything was written

    code, _, err = run(capsys, "--hr", photos, "--out", out, "--size", 130)
    assert code == 2 and "--size is 130; expected a multiple of --scale 4 of at least 76" in err

    shutil.copy(photos / "chelsea.png", photos / "coffee.png")
    code, _, err = run(capsys, "--hr", photos, "--out", out, "--size", 128)
    assert code == 2 and "coffee.jpg and " in err and "would both be written as coffee.png" in err
    (photos / "coffee.png").unlink()

    (photos / "broken.png").write_bytes(b"not a png")
    code, _, err = run(capsys, "--hr", photos, "--out", out, "--size", 128)
    assert code == 2 and f"HR image {photos / 'broken.png'} cannot be read as an image" in err
