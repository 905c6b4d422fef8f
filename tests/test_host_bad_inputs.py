"""Bad input fails its prompt with a message naming the input and what was expected; ComfyUI keeps serving."""

from __future__ import annotations

import itertools
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import comfy_host as H  # skips this module without COMFYUI_PATH

import graph_references as R
from parity import assert_parity, parity_fixture

_FRESH_SEEDS = itertools.count(1000)


def fails_with(prompt: dict, message: str) -> None:
    executor, _ = H.run(prompt)
    assert not executor.success
    assert message in H.error_message(executor), H.error_message(executor)


def still_serving() -> None:
    """After a failed prompt the next one runs (a fresh seed, so nothing is served from the cache)."""
    H.run_ok(H.graph(seed=next(_FRESH_SEEDS)))


def test_one_prompt_per_image_restores_each_image_with_its_own_prompt():
    """Changing image 2's prompt changes image 2 alone; the run itself matches its stored reference."""
    executor = R.run_graph("per_image_prompts")  # "a red brick wall|a green field|a blue sky"
    image = H.output(executor, "5")
    assert image.shape == (3, 32, 32, 3)
    R.assert_matches_reference("per_image_prompts", executor)
    changed, _ = H.run_ok(R.per_image_prompts("a red brick wall|a green field|a green field", 3))
    changed = H.output(changed, "5")
    assert_parity(changed[:2], image[:2], "images 0 and 1, whose prompts did not change")
    assert (changed[2] - image[2]).abs().max() > 1e-2, "image 2 did not follow its new prompt"


def test_prompts_that_do_not_match_the_batch_are_refused():
    fails_with(R.per_image_prompts("a cat|a dog", 3),
               "positive conditioning holds 2 prompts but the image batch has 3 images")
    still_serving()


def test_lr_smaller_than_8_px_is_refused():
    fails_with(H.graph(height=5, width=40), "image is 40x5 px; expected at least 8 px per side")
    still_serving()


def test_nan_in_the_image_is_refused(monkeypatch):
    clean_image = H.test_image

    def nan_image(*args, **kwargs):
        image = clean_image(*args, **kwargs)
        image[0, 3, 3, 0] = float("nan")
        return image

    monkeypatch.setattr(H, "test_image", nan_image)
    fails_with(H.graph(seed=3), "image contains NaN or Inf values")
    monkeypatch.undo()
    still_serving()


def test_an_output_too_large_for_memory_is_refused_before_work_with_the_estimate():
    fails_with(H.graph(height=2048, width=2048, scale=16.0), "an output of 32768x32768 px x 1 needs about")
    still_serving()


@pytest.mark.parametrize("family", ["SD20", "SDXL"])
def test_sd2_and_sdxl_models_are_refused(monkeypatch, family: str):
    import comfy.supported_models

    make_model = H.make_model

    def foreign_model():
        model = make_model()
        model.model.model_config = getattr(comfy.supported_models, family)(dict(model.model.model_config.unet_config))
        return model

    monkeypatch.setattr(H, "make_model", foreign_model)
    fails_with(H.graph(seed=4), f"XPSR needs a Stable Diffusion 1.5 MODEL; the MODEL given is {family}")
    monkeypatch.undo()
    still_serving()


def xpsr_folder_file(name: str):
    H.setup_host()
    return H.folder_paths.get_folder_paths("xpsr")[0] + "/" + name


def test_a_stock_controlnet_file_given_as_xpsr_is_refused():
    xpsr = load_file(parity_fixture().checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors")
    stock = {k: v for k, v in xpsr.items() if not any(
        part in k for part in (".attentions_lowlevel.", ".attentions_connect.", "to_rgbs.", "conv_degradation"))}
    save_file(stock, xpsr_folder_file("control_v11f1e_sd15_tile.safetensors"))
    prompt = H.graph(seed=5)
    prompt["2"]["inputs"]["xpsr_model"] = "control_v11f1e_sd15_tile.safetensors"
    fails_with(prompt, "this is a stock ControlNet")
    still_serving()


def test_a_truncated_file_is_refused():
    source = H.folder_paths.get_full_path("xpsr", H.XPSR_FILE)
    target = xpsr_folder_file("xpsr_truncated.safetensors")
    shutil.copyfile(source, target)
    with open(target, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    prompt = H.graph(seed=6)
    prompt["2"]["inputs"]["xpsr_model"] = "xpsr_truncated.safetensors"
    fails_with(prompt, "xpsr_truncated.safetensors: truncated")
    still_serving()


def test_a_model_file_that_is_gone_is_named_in_the_error():
    """Listed when the prompt was validated, gone when it runs (hosts that validate combo values refuse a name
    that is no longer listed before this)."""
    target = xpsr_folder_file("xpsr_gone.safetensors")
    shutil.copyfile(H.folder_paths.get_full_path("xpsr", H.XPSR_FILE), target)
    prompt = H.graph(seed=7)
    prompt["2"]["inputs"]["xpsr_model"] = "xpsr_gone.safetensors"
    valid = H.validate(prompt)
    os.remove(target)
    executor, _ = H.run(prompt, valid)
    assert not executor.success
    assert "XPSR model 'xpsr_gone.safetensors' not found" in H.error_message(executor)
    still_serving()
