"""XPSR Dual Prompt Encode: official tokenisation, CFG modes, and standard CONDITIONING that keeps c_l."""

from __future__ import annotations

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

import nodes

LONG_CAPTION = ("The image shows a (small) wooden cabin in a snowy forest, with tall pine trees around it, smoke "
                "rising from the chimney, a frozen lake in the foreground, mountains far away under a pale sky, "
                "and a narrow path leading from the lake to the door of the cabin. ") * 2


@pytest.fixture(scope="module")
def clip():
    H.setup_host()
    return H.make_clip()


def encode_node():
    return H.pack_module("nodes.prompt_encode")


def encoded(clip, **overrides):
    """The node's outputs; like ComfyUI with is_input_list, every input arrives as a list."""
    inputs = dict(high_level="a cat", low_level="blurry, noisy", added_prompt="clean", negative_high="blurry",
                  negative_low="high resolution", token_mode="official", lowlevel_cfg="official") | overrides
    lists = {k: v if isinstance(v, list) else [v] for k, v in inputs.items()}
    return encode_node().XPSRDualPromptEncode.execute([clip], **lists).args


def lowlevel(conditioning) -> torch.Tensor:
    return conditioning[0][1]["model_conds"]["xpsr_lowlevel"].cond


def test_official_tokens_are_plain_77_token_truncation(clip):
    hf = clip.tokenizer.clip_l.tokenizer
    reference = hf(LONG_CAPTION, truncation=True, max_length=77, padding="max_length")["input_ids"]
    tokens = encode_node().official_tokens(clip, LONG_CAPTION)["l"]
    assert len(tokens) == 1 and [t for t, _ in tokens[0]] == reference
    assert all(w == 1.0 for _, w in tokens[0])


def test_official_mode_ignores_weight_syntax_and_comfy_mode_parses_it(clip):
    official = [t for t, _ in encode_node().official_tokens(clip, "a (red:1.5) car")["l"][0]]
    literal = clip.tokenizer.clip_l.tokenizer("a (red:1.5) car")["input_ids"]
    assert official[:len(literal)] == literal
    comfy_weights = {w for t, w in clip.tokenize("a (red:1.5) car")["l"][0]}
    assert 1.5 in comfy_weights


def test_comfy_mode_keeps_long_prompts_in_chunks(clip):
    positive, _ = encoded(clip, high_level=LONG_CAPTION, token_mode="comfy")
    assert positive[0][0].shape[1] > 77
    positive, _ = encoded(clip, high_level=LONG_CAPTION, token_mode="official")
    assert positive[0][0].shape[1] == 77


def test_added_prompt_is_appended_to_the_high_level_prompt(clip):
    positive, _ = encoded(clip, high_level="a cat", added_prompt="clean")
    reference = clip.encode_from_tokens_scheduled(encode_node().official_tokens(clip, "a cat clean"))
    torch.testing.assert_close(positive[0][0], reference[0][0])


def test_lowlevel_cfg_official_replaces_and_paper_keeps_the_low_level_prompt(clip):
    positive, negative = encoded(clip, lowlevel_cfg="official")
    assert not torch.allclose(lowlevel(positive), lowlevel(negative))
    positive, negative = encoded(clip, lowlevel_cfg="paper")
    torch.testing.assert_close(lowlevel(positive), lowlevel(negative))


def test_conditioning_nodes_in_between_keep_the_low_level_embedding(clip):
    positive, _ = encoded(clip)
    (ranged,) = nodes.ConditioningSetTimestepRange().set_range(positive, 0.0, 0.5)
    (combined,) = nodes.ConditioningCombine().combine(ranged, positive)
    assert all("xpsr_lowlevel" in c[1]["model_conds"] for c in combined)


def test_sdxl_style_clip_is_refused(clip):
    class NotSD15Tokenizer:
        clip_name = "g"

    class FakeClip:
        tokenizer = NotSD15Tokenizer()

    with pytest.raises(ValueError, match="XPSR needs Stable Diffusion 1.5's CLIP"):
        encode_node().official_tokens(FakeClip(), "a cat")


def test_one_prompt_per_image_gives_a_batched_conditioning(clip):
    """Row i of every embedding, in both branches, is image i's prompts encoded alone."""
    high, low = ["a cat", "a dog", "a bird"], ["sharp", "blurry", "noisy"]
    positive, negative = encoded(clip, high_level=high, low_level=low)
    assert positive[0][0].shape[0] == 3 and lowlevel(positive).shape[0] == 3
    assert negative[0][0].shape[0] == 3 and lowlevel(negative).shape[0] == 3
    for i in range(3):
        alone_positive, alone_negative = encoded(clip, high_level=high[i], low_level=low[i])
        torch.testing.assert_close(positive[0][0][i:i + 1], alone_positive[0][0])
        torch.testing.assert_close(lowlevel(positive)[i:i + 1], lowlevel(alone_positive))
        torch.testing.assert_close(negative[0][0][i:i + 1], alone_negative[0][0])
        torch.testing.assert_close(lowlevel(negative)[i:i + 1], lowlevel(alone_negative))


def test_prompt_lists_of_different_lengths_are_refused(clip):
    with pytest.raises(ValueError, match="low_level has 2 prompts while other prompts have 3"):
        encoded(clip, high_level=["a", "b", "c"], low_level=["x", "y"])


def test_comfy_mode_batches_prompts_of_different_lengths(clip):
    positive, _ = encoded(clip, high_level=["a cat", LONG_CAPTION], token_mode="comfy")
    assert positive[0][0].shape[0] == 2 and positive[0][0].shape[1] % 77 == 0
