"""The Degradation-Free Constraint equals its hand computation, in the official (3 + 13) and the paper (3 + 3) form."""

from __future__ import annotations

import pytest
import torch

from xpsr_core.models.controlnet import ControlNetOutput
from xpsr_core.training.losses import dfc_loss, diffusion_loss, paper_latent_heads


def constant_output(rgb_values, latent_values, mid_value, size=16) -> ControlNetOutput:
    rgb = [torch.full((1, 3, size // 2 ** (i + 1), size // 2 ** (i + 1)), v) for i, v in enumerate(rgb_values)]
    latent = [torch.full((1, 4, 2, 2), v) for v in latent_values]
    return ControlNetOutput([], torch.zeros(1), rgb, latent, torch.full((1, 4, 1, 1), mid_value))


def test_official_form_sums_three_pixel_and_thirteen_latent_terms():
    out = constant_output([0.1, 0.2, 0.3], [float(i) for i in range(12)], 2.0)
    hr_image, hr_latent = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 4, 4, 4), -1.0)
    expected = 0.05 * (0.4 + 0.3 + 0.2 + sum(i + 1.0 for i in range(12)) + 3.0)
    assert dfc_loss(out, hr_image, hr_latent, layers_per_block=2).item() == pytest.approx(expected, rel=1e-6)


def test_paper_form_uses_the_three_downsampled_latent_scales():
    assert paper_latent_heads(12, 2) == [3, 6, 9]
    assert paper_latent_heads(8, 1) == [2, 4, 6]
    out = constant_output([0.1, 0.2, 0.3], [float(i) for i in range(12)], 2.0)
    hr_image, hr_latent = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 4, 4, 4), -1.0)
    expected = 0.05 * (0.4 + 0.3 + 0.2 + 4.0 + 7.0 + 10.0)
    assert dfc_loss(out, hr_image, hr_latent, 2, form="paper").item() == pytest.approx(expected, rel=1e-6)


def test_targets_are_bilinear_downsamples_of_the_clean_image():
    hr_image = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).expand(1, 3, 2, 2)
    out = ControlNetOutput([], torch.zeros(1), [torch.zeros(1, 3, 1, 1)] * 3, [torch.zeros(1, 4, 1, 1)] * 12,
                           torch.zeros(1, 4, 1, 1))
    loss = dfc_loss(out, hr_image, torch.zeros(1, 4, 2, 2), layers_per_block=2)
    assert loss.item() == pytest.approx(0.05 * 3 * 4.0)  # each pixel head's target is the 2x2 mean, 4


def test_missing_dfc_predictions_are_refused():
    with pytest.raises(ValueError, match="return_dfc=True"):
        dfc_loss(ControlNetOutput([], torch.zeros(1)), torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 1, 1), 2)
    with pytest.raises(ValueError, match="DFC form is 'both'"):
        dfc_loss(constant_output([0, 0, 0], [0] * 12, 0), torch.zeros(1, 3, 16, 16), torch.zeros(1, 4, 4, 4), 2,
                 form="both")


def test_diffusion_loss_is_mse_to_the_noise():
    assert diffusion_loss(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)).item() == 1.0
