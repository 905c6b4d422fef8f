"""The training objective: the paper's Eq. 5, L = L_D + λ L_DFC, the diffusion loss (Eq. 4) plus the
Degradation-Free Constraint (DFC, Eq. 3).

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
    """λ L_DFC of Eq. 5 for one ControlNet pass run with ``return_dfc=True``: the paper's Eq. 3, times ``weight``.

        L_DFC = Σ_{i=1..3} ||x_hr,i − x̂_i||_1 + Σ_j ||z_hr,j − ẑ_j||_1        (3)

    ``hr_image`` (B, 3, H, W) is the clean image in [-1, 1] and ``hr_latent`` (B, 4, H/8, W/8)
    its scaled VAE latent; x_hr,i and z_hr,j are these resized (bilinear) to each head's size.
    x̂_i are ``out.dfc_rgb``: 3 of (B, 3, H/2^i, W/2^i), the pixel heads of the LR encoder.
    ẑ_j are ``out.dfc_latent``: one (B, 4, h_j, w_j) per zero-conv residual (12 for SD1.5, at
    the latent's 1, 1/2, 1/4 and 1/8 size), and ``out.dfc_latent_mid`` (B, 4, H/64, W/64).
    form "paper" sums the 3 latent heads of Eq. 3's three scales (after each of the first three
    downsamplers, ``paper_latent_heads``); "official" sums all 13, as train.py does. Each norm
    is a mean over the elements (train.py's L1Loss), so a term does not grow with the image
    size, and λ multiplies every term, as there.
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
    """L_D of the paper's Eq. 4, the noise-prediction loss of an epsilon-prediction model (SD1.5):

        L_D = E[ ||ε − ε_θ(z_hr^t, t, c_h, c_l, x_lr)||_2^2 ]        (4)

    ``eps_prediction`` and ``noise`` are (B, 4, h, w), ε_θ's output and the ε added to the HR
    latent z_hr at timestep t. The expectation is a mean over the batch and the elements
    (train.py's MSE), taken in float32 whatever precision the models ran in.
    """
    return F.mse_loss(eps_prediction.float(), noise.float())
