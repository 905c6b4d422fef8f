"""The training objective: diffusion loss plus the Degradation-Free Constraint (DFC).

The DFC pulls the ControlNet's features of the degraded LR image towards the clean image:
the pixel heads (``to_rgbs``) towards the HR image at 1/2, 1/4 and 1/8 size, the latent
heads (``conv_degradation*``) towards the HR latent at their resolutions. The released
train.py applies lambda = 0.05 to each of 3 pixel and 13 latent terms (every zero-conv
residual plus the mid block); the paper's Eq. 3 has 3 + 3 terms. Both are offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.controlnet import ControlNetOutput

DFC_WEIGHT = 0.05
"""lambda of the released train.py: the one default of every DFC weight (losses, LossSettings, TrainConfig)."""
DFC_FORMS = ("official", "paper")


def _l1_to(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    resized = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear")
    return F.l1_loss(prediction.float(), resized.float())


def paper_latent_heads(count: int, layers_per_block: int) -> list[int]:
    """The latent heads of the paper's three scales: the residuals after each of the first three downsamplers."""
    return [(layers_per_block + 1) * (level + 1) for level in range(3) if (layers_per_block + 1) * (level + 1) < count]


def dfc_loss(out: ControlNetOutput, hr_image: torch.Tensor, hr_latent: torch.Tensor, layers_per_block: int,
             form: str = "official", weight: float = DFC_WEIGHT) -> torch.Tensor:
    """The Degradation-Free Constraint for one ControlNet pass run with ``return_dfc=True``.

    ``hr_image`` is the clean image in [-1, 1], ``hr_latent`` its scaled VAE latent.
    """
    if form not in DFC_FORMS:
        raise ValueError(f"DFC form is {form!r}; expected one of {DFC_FORMS}")
    if out.dfc_rgb is None or out.dfc_latent is None:
        raise ValueError("the ControlNet output has no DFC predictions; run it with return_dfc=True on a model "
                         "with return_rgbs and use_latent_pred")
    terms = [_l1_to(hr_image, rgb) for rgb in out.dfc_rgb]
    if form == "official":
        terms += [_l1_to(hr_latent, z) for z in out.dfc_latent] + [_l1_to(hr_latent, out.dfc_latent_mid)]
    else:
        terms += [_l1_to(hr_latent, out.dfc_latent[i]) for i in paper_latent_heads(len(out.dfc_latent),
                                                                                   layers_per_block)]
    return weight * torch.stack(terms).sum()


def diffusion_loss(eps_prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the added noise (SD1.5 is an epsilon-prediction model)."""
    return F.mse_loss(eps_prediction.float(), noise.float())
