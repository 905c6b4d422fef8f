"""Classifier-free guidance with XPSR's two prompts: the paper's Eq. 6.

Each step evaluates the model twice on the same noisy latent z_lr^t (B, 4, h, w), the LR
image x_lr (B, 3, 8h, 8w) and timestep t, once per branch:

    ε̂     = ε_θ(z_lr^t, t, c_h,   c_l, x_lr)        positive branch
    ε̂_neg = ε_θ(z_lr^t, t, c_neg, c_l, x_lr)        negative branch
    ε̃     = ε̂ + λ_s (ε̂ − ε̂_neg)                     (6)

c_h is the high-level prompt's embedding (the caption plus the added prompt), c_l the
low-level one's (the image's quality), c_neg the negative prompt's: SD1.5's CLIP-L last
hidden states, each (B, 77, 768) (77·k tokens with ComfyUI's chunking; B is 1 for one
prompt shared by all images). c_h and c_neg reach the ControlNet's high-level attentions
and the UNet's cross-attentions; c_l reaches only the ControlNet's low-level attentions.

Which embeddings go in which branch is the one point where the paper and the released code
differ, so both are kept (``LOWLEVEL_CFG_MODES``): the paper replaces only c_h in the
negative branch; the released pipeline (pipelines/pipeline_xpsr.py) also replaces c_l, by
the embedding c_neg_l of a hard-coded low-level negative prompt (prompts.NEGATIVE_LOW).

The combination is not computed here: the two branches go to ComfyUI as the positive and
negative CONDITIONING, and ComfyUI's sampler (comfy.samplers.cfg_function) combines them as
``uncond + cfg * (cond - uncond)``, the form diffusers uses too, with cond = ε̂ and
uncond = ε̂_neg (ComfyUI combines the denoised predictions x − σε; their weights sum to one,
so that is the same combination of ε). Eq. 6 is the same line written around ε̂:
ε̃ = ε̂_neg + (λ_s + 1)(ε̂ − ε̂_neg), so cfg = λ_s + 1. The paper's λ_s = 5.5 is cfg 6.5. The
released pipeline uses diffusers' form with guidance_scale 4.5 (configs/xpsr_test.yaml), that
is λ_s = 3.5; the XPSR Sampler's default cfg 4.5 and the parity fixture's trajectories
(``eps_uncond + 4.5 * (eps_cond - eps_uncond)``) are that.
"""

from __future__ import annotations

from typing import TypeVar

LOWLEVEL_CFG_MODES = ("official", "paper")
"""official: the negative branch gets c_neg_l (prompts.NEGATIVE_LOW), as the released pipeline; paper (Eq. 6): it
keeps c_l."""

Prompt = TypeVar("Prompt")


def cfg_branches(c_h: Prompt, c_l: Prompt, c_neg: Prompt, c_neg_l: Prompt,
                 mode: str) -> tuple[tuple[Prompt, Prompt], tuple[Prompt, Prompt]]:
    """The (high-level, low-level) prompts of the positive and the negative branch of Eq. 6 under ``mode``.

    positive: (c_h, c_l) in both modes; negative: (c_neg, c_l) in the paper, (c_neg, c_neg_l)
    in the released code. The prompts are embeddings (B, 77, 768), or anything that stands
    for them, such as the texts they are encoded from: XPSR Dual Prompt Encode selects texts,
    so it encodes only the prompts a branch uses.
    """
    if mode not in LOWLEVEL_CFG_MODES:
        raise ValueError(f"lowlevel_cfg is {mode!r}; expected one of {LOWLEVEL_CFG_MODES}")
    return (c_h, c_l), (c_neg, c_neg_l if mode == "official" else c_l)
