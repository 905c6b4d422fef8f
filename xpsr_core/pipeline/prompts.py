"""Prompt defaults of the official code and the paper, and how the two prompts are assembled."""

from __future__ import annotations

ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
"""Appended to the high-level caption by the official test configuration."""

NEGATIVE_HIGH = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
"""The high-level negative prompt of the official test configuration."""

NEGATIVE_LOW = "high resolution, best quality, clear"
"""The low-level negative prompt hard-coded in the official pipeline (c_neg_l of guidance.cfg_branches)."""


def high_level_prompt(caption: str, added_prompt: str) -> str:
    """The official high-level prompt: the caption, a space, the added prompt."""
    return " ".join(p for p in (caption.strip(), added_prompt.strip()) if p)
