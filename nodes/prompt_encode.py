"""XPSR Dual Prompt Encode: c_h and c_l with SD1.5's CLIP, as standard CONDITIONING.

The low-level embedding rides in each conditioning entry's ``model_conds``, so ComfyUI
batches it per CFG branch and the usual conditioning nodes can sit in between. Which prompts
fill which branch (Eq. 6, paper or released code) is xpsr_core.pipeline.guidance's choice,
made on the texts, so each distinct text is encoded once (per-image and per-tile lists repeat
texts). With a tile grid, per-tile lists become per-tile conditioning (tile_prompts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

import comfy.conds
import comfy.sd1_clip
from comfy_api.latest import io

from ..xpsr_core.pipeline.guidance import LOWLEVEL_CFG_MODES, cfg_branches
from ..xpsr_core.pipeline.prompts import ADDED_PROMPT, NEGATIVE_HIGH, NEGATIVE_LOW, high_level_prompt
from ..xpsr_core.pipeline.tiling import TileGrid
from .common import CATEGORY, LOWLEVEL_KEY, XPSRTileGridType
from .tile_prompts import allowed_counts, split_by_tile

TOKEN_MODES = ("official", "comfy")


def official_tokens(clip, text: str) -> dict:
    """Plain 77-token truncation without weight syntax, as the released pipeline tokenised prompts."""
    tokenizer = clip.tokenizer
    if not isinstance(tokenizer, comfy.sd1_clip.SD1Tokenizer) or tokenizer.clip_name != "l":
        raise ValueError(f"XPSR needs Stable Diffusion 1.5's CLIP (CLIP-L); the CLIP given uses "
                         f"{type(tokenizer).__name__}")
    clip_l = getattr(tokenizer, tokenizer.clip)
    ids = clip_l.tokenizer(text, add_special_tokens=False)["input_ids"][: clip_l.max_length - 2]
    row = [clip_l.start_token, *ids, clip_l.end_token]
    row += [clip_l.pad_token] * (clip_l.max_length - len(row))
    return {tokenizer.clip_name: [[(t, 1.0) for t in row]]}


def encode_texts(clip, texts: Iterable[str], token_mode: str) -> dict[str, list]:
    """Each distinct text's CONDITIONING, encoded once: per-image and per-tile lists repeat texts (the negative
    prompts in every tile)."""
    return {t: clip.encode_from_tokens_scheduled(official_tokens(clip, t) if token_mode == "official"
                                                 else clip.tokenize(t)) for t in dict.fromkeys(texts)}


def stacked(encoded: dict[str, list], texts: Sequence[str]) -> list:
    """One CONDITIONING for several prompts: entry tensors stacked along the batch, one row per prompt."""
    rows = [encoded[t] for t in texts]
    return [[_stack([e[i][0] for e in rows]), {**rows[0][i][1], "pooled_output": _stack(
        [e[i][1]["pooled_output"] for e in rows])}] for i in range(len(rows[0]))]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the batch; token counts that differ are repeated to a common length, as ComfyUI does."""
    if len(tensors) == 1:
        return tensors[0]
    length = math.lcm(*(t.shape[1] for t in tensors)) if tensors[0].ndim == 3 else None
    return torch.cat([t.repeat(1, length // t.shape[1], 1) if length else t for t in tensors])


def prompt_count(prompts: dict[str, list[str]], grid: TileGrid | None) -> int:
    """How many prompts every list is broadcast to: one for all, or one per image; with a tile grid of several
    tiles, one per tile (of each image). Any other count would silently pair the wrong prompts."""
    count = max(len(v) for v in prompts.values())
    allowed = (1, count) if grid is None else allowed_counts(grid)
    for name, values in prompts.items():
        if len(values) not in allowed or len(values) not in (1, count):
            if grid is None:
                raise ValueError(f"{name} has {len(values)} prompts while other prompts have {count}; expected one "
                                 "prompt for all images or one per image")
            raise ValueError(f"{name} has {len(values)} prompts; with tile_grid ({grid.describe()}, "
                             f"{grid.images} image(s)) expected {' or '.join(map(str, allowed))}: one for all "
                             "tiles or one per tile of each image, the same count in every list")
    return count


def with_lowlevel(conditioning: list, lowlevel: list) -> list:
    """``conditioning`` with the low-level embedding added to every entry's model_conds."""
    c_l = lowlevel[0][0]
    out = []
    for cond, extra in conditioning:
        model_conds = {**extra.get("model_conds", {}), LOWLEVEL_KEY: comfy.conds.CONDCrossAttn(c_l)}
        out.append([cond, {**extra, "model_conds": model_conds}])
    return out


class XPSRDualPromptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="XPSRDualPromptEncode",
            display_name="XPSR Dual Prompt Encode",
            category=CATEGORY,
            description="Encodes XPSR's two prompts with SD1.5's CLIP: the high-level one (what the image shows) and "
                        "the low-level one (its quality). Gives standard CONDITIONING that carries both. Lists of "
                        "prompts (e.g. one caption per image from XPSR Caption) give one prompt per image of a batch.",
            is_input_list=True,
            inputs=[
                io.Clip.Input("clip", tooltip="SD1.5's CLIP, from the same Load Checkpoint as the MODEL."),
                io.String.Input("high_level", multiline=True, default="",
                                tooltip="What the image shows (an MLLM caption, or typed)."),
                io.String.Input("low_level", multiline=True, default="",
                                tooltip="The image's quality: blur, noise, colour, lighting (an MLLM caption, or "
                                        "typed)."),
                io.String.Input("added_prompt", multiline=True, default=ADDED_PROMPT,
                                tooltip="Appended to the high-level prompt (official default)."),
                io.String.Input("negative_high", multiline=True, default=NEGATIVE_HIGH,
                                tooltip="Negative prompt replacing the high-level prompt in the CFG negative branch "
                                        "(official default)."),
                io.String.Input("negative_low", multiline=True, default=NEGATIVE_LOW,
                                tooltip="Replaces the low-level prompt in the negative branch when lowlevel_cfg is "
                                        "official (official default)."),
                io.Combo.Input("token_mode", options=list(TOKEN_MODES), default="official",
                               tooltip="official: plain 77-token truncation, no weight syntax, as the released "
                                       "pipeline (long captions lose their tail). comfy: ComfyUI's chunking and "
                                       "(word:1.2) weights."),
                io.Combo.Input("lowlevel_cfg", options=list(LOWLEVEL_CFG_MODES), default="official",
                               tooltip="official: the negative branch gets negative_low, as the released pipeline. "
                                       "paper: the low-level prompt is kept in both branches (Eq. 6)."),
                XPSRTileGridType.Input("tile_grid", optional=True,
                                       tooltip="From XPSR Tile Grid: the prompt lists are then one per latent tile "
                                               "(one list entry per tile, image by image), so each tile of XPSR "
                                               "Sampler gets its own c_h and c_l. A single prompt still means the "
                                               "same for every tile."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="Both prompts of the positive branch, for XPSR Sampler or XPSR Apply."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="Both prompts of the negative branch, for XPSR Sampler or XPSR Apply."),
            ],
        )

    @classmethod
    def execute(cls, clip: list, high_level: list[str], low_level: list[str], added_prompt: list[str],
                negative_high: list[str], negative_low: list[str], token_mode: list[str],
                lowlevel_cfg: list[str], tile_grid: list[TileGrid] | None = None) -> io.NodeOutput:
        clip, added, mode, cfg_mode = clip[0], added_prompt[0], token_mode[0], lowlevel_cfg[0]
        if mode not in TOKEN_MODES:
            raise ValueError(f"token_mode is {mode!r}; expected one of {TOKEN_MODES}")
        grid = tile_grid[0] if tile_grid else None
        prompts = {"high_level": high_level, "low_level": low_level, "negative_high": negative_high,
                   "negative_low": negative_low}
        count = prompt_count(prompts, grid)
        prompts = {name: values * (count // len(values)) for name, values in prompts.items()}
        branches = cfg_branches(tuple(high_level_prompt(t, added) for t in prompts["high_level"]),
                                tuple(t.strip() for t in prompts["low_level"]), tuple(prompts["negative_high"]),
                                tuple(prompts["negative_low"]), cfg_mode)
        encoded = encode_texts(clip, (text for branch in branches for prompt in branch for text in prompt), mode)
        positive, negative = (with_lowlevel(stacked(encoded, high), stacked(encoded, low)) for high, low in branches)
        if grid is not None and grid.count > 1 and count > 1:
            positive, negative = split_by_tile(positive, grid), split_by_tile(negative, grid)
        return io.NodeOutput(positive, negative)
