"""Whole graphs in ComfyUI's executor: sizes, tiling, model management, chaining with KSampler, interrupts.

Sampler outputs are compared with stored references (graph_references.py says how to re-record them).
"""

from __future__ import annotations

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.model_management as mm
import comfy.utils
import latent_preview

import graph_references as R


@pytest.mark.parametrize("graph", ["whole", "tiled"])
def test_graph_upscales_37x53_to_exactly_148x212(graph: str):
    executor = R.run_graph(graph)
    image = H.output(executor, "5")
    assert image.shape == (1, 148, 212, 3)
    assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
    latent = H.output(executor, "5", 1)["samples"]
    assert latent.shape == (1, 4, 18, 26) and torch.isfinite(latent).all()
    R.assert_matches_reference(graph, executor)


def test_tiling_changes_the_computation_but_not_the_shape():
    whole = H.output(H.run_ok(H.graph(tile_size=320))[0], "5", 1)["samples"]
    tiled = H.output(H.run_ok(H.graph(tile_size=8, tile_overlap=2))[0], "5", 1)["samples"]
    assert whole.shape == tiled.shape
    assert not torch.allclose(whole, tiled)


@pytest.mark.parametrize("channels", [1, 2, 4], ids=["gray", "gray_alpha", "rgba"])
def test_any_channel_layout_gives_rgb(channels: int):
    executor = R.run_graph(f"channels_{channels}")
    assert H.output(executor, "5").shape == (1, 32, 48, 3)
    R.assert_matches_reference(f"channels_{channels}", executor)


def test_image_batch_keeps_every_image():
    executor = R.run_graph("batch_of_3")
    image = H.output(executor, "5")
    assert image.shape == (3, 32, 40, 3)
    assert not torch.allclose(image[0], image[1])
    R.assert_matches_reference("batch_of_3", executor)


@pytest.mark.parametrize("start", ["official", "noise", "img2img"])
def test_every_start_and_a_comfy_scheduler_run(start: str):
    executor = R.run_graph(f"start_{start}")
    image = H.output(executor, "5")
    assert image.shape == (1, 148, 212, 3) and torch.isfinite(image).all()
    R.assert_matches_reference(f"start_{start}", executor)


def test_official_schedule_is_951_to_1_for_20_steps():
    sampling = H.pack_module("nodes.sampling")
    model = H.make_model()
    sigmas = sampling.sampling_sigmas(model, "ddpm", sampling.OFFICIAL_SCHEDULER, 20, 1.0)
    ms = model.get_model_object("model_sampling")
    timesteps = [int(ms.timestep(s)) for s in sigmas[:-1]]
    assert timesteps == list(range(951, 0, -50)) and sigmas[-1] == 0


def test_xpsr_weights_are_loaded_with_the_unet_while_sampling_and_offloaded_after():
    control_module = H.pack_module("xpsr_core.models.controlnet").SFAControlNet
    attention_module = H.pack_module("xpsr_core.models.conditional_attention").ConditionalAttention
    seen: list[set[str]] = []

    def loaded_kinds() -> set[str]:
        kinds = set()
        for loaded in mm.current_loaded_models:
            model = loaded.model.model
            if isinstance(model, attention_module):
                kinds.add("conditional_attention")
            elif any(isinstance(m, control_module) for m in model.modules()):
                kinds.add("controlnet")
            elif hasattr(model, "diffusion_model"):
                kinds.add("unet")
            devices = {p.device for p in model.parameters()}
            assert devices == {loaded.device}, (type(model).__name__, devices)
        return kinds

    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append(loaded_kinds()))
    try:
        H.run_ok(H.graph(seed=11))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert seen and all({"unet", "controlnet", "conditional_attention"} <= kinds for kinds in seen)
    mm.unload_all_models()
    assert not {"controlnet", "conditional_attention"} & loaded_kinds()


def test_ksampler_fed_by_xpsr_apply_equals_xpsr_sampler():
    settings = dict(seed=5, steps=3, cfg=4.5, sampler_name="euler", scheduler="normal", denoise=0.7)
    prompt = H.graph(height=64, width=64, scale=1.0, process_size=64, start="img2img", color_fix="none", **settings)
    prompt |= {
        "7": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "8": {"class_type": "XPSRApply", "inputs": {"positive": ["3", 0], "negative": ["3", 1],
                                                     "xpsr_controlnet": ["2", 1], "image": ["4", 0], "strength": 1.0,
                                                     "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["8", 0], "negative": ["8", 1],
                                                    "latent_image": ["7", 0], **settings}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "xpsr_chain"}},
    }
    executor, _ = H.run_ok(prompt)
    chained = H.output(executor, "9")["samples"]
    direct = H.output(executor, "5", 1)["samples"]
    torch.testing.assert_close(chained, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tile_size", [320, 8], ids=["between_steps", "between_tiles"])
def test_interrupt_stops_sampling_and_the_next_run_works(tile_size: int):
    calls = []

    def interrupt_on_first_progress(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 1:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_on_first_progress)
    try:
        executor, server = H.run(H.graph(seed=21, tile_size=tile_size, tile_overlap=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not executor.success
    assert any(event == "execution_interrupted" for event, _ in server.messages)
    assert len(calls) == 1
    H.run_ok(H.graph(seed=22, tile_size=tile_size, tile_overlap=2))


def test_non_sd15_model_is_refused_with_a_clear_error():
    import comfy.supported_models

    H.setup_host()
    loader = H.pack_module("nodes.loader").XPSRLoader
    model = H.make_model()
    model.model.model_config = comfy.supported_models.SDXL(dict(model.model.model_config.unet_config))
    with pytest.raises(ValueError, match="XPSR needs a Stable Diffusion 1.5 MODEL; the MODEL given is SDXL"):
        loader.execute(model, H.XPSR_FILE, "auto")


def test_bad_node_input_fails_the_prompt_and_the_server_keeps_serving():
    prompt = H.graph()
    prompt["2"]["inputs"]["xpsr_model"] = H.XPSR_FILE
    prompt["4"]["inputs"]["channels"] = 5
    executor, _ = H.run(prompt)
    assert not executor.success and "image has 5 channels" in H.error_message(executor)
    H.run_ok(H.graph(seed=31))


@pytest.mark.parametrize("weight_dtype", ["fp16", "bf16", "fp32"])
def test_weight_dtypes_load_and_sample(weight_dtype: str):
    executor = R.run_graph(f"weights_{weight_dtype}")
    image = H.output(executor, "5")
    assert image.shape == (1, 148, 212, 3) and torch.isfinite(image).all()
    R.assert_matches_reference(f"weights_{weight_dtype}", executor)
    control = H.output(executor, "2", 1)
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[weight_dtype]
    assert {p.dtype for p in control.control_model.parameters()} == {expected}


def test_official_checkpoint_folder_loads_through_the_node():
    import shutil

    from parity import parity_fixture

    H.setup_host()
    base = H.folder_paths.get_folder_paths("xpsr")[0]
    target = f"{base}/runs/xpsr/checkpoint-1"
    shutil.copytree(parity_fixture().checkpoint, target, dirs_exist_ok=True)
    listed = H.pack_module("nodes.model_files").list_models()
    assert "runs/xpsr/checkpoint-1" in listed and H.XPSR_FILE in listed
    prompt = H.graph(seed=51)
    prompt["2"]["inputs"]["xpsr_model"] = "runs/xpsr/checkpoint-1"
    H.run_ok(prompt)


def test_xpsr_controlnet_survives_copy():
    H.setup_host()
    loader = H.pack_module("nodes.loader").XPSRLoader
    _, control = loader.execute(H.make_model(), H.XPSR_FILE, "auto").args
    copy = control.copy()
    assert type(copy) is type(control) and copy.control_model is control.control_model
    assert copy.extra_conds == ["xpsr_lowlevel"] and copy.get_models() == control.get_models()


def test_tiled_vae_and_wavelet_colour_fix_run():
    executor = R.run_graph("tiled_vae_wavelet")
    image = H.output(executor, "5")
    assert image.shape == (1, 148, 212, 3) and torch.isfinite(image).all()
    R.assert_matches_reference("tiled_vae_wavelet", executor)


def test_latent_previews_are_sent_with_progress(monkeypatch):
    from comfy.cli_args import LatentPreviewMethod

    monkeypatch.setattr(H.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    # later hosts set the method again at every prompt, from the prompt's extra data or this default
    monkeypatch.setattr(latent_preview, "default_preview_method", LatentPreviewMethod.Latent2RGB, raising=False)
    previews = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: previews.append(preview))
    try:
        H.run_ok(H.graph(seed=71, steps=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(previews) == 2 and all(p is not None for p in previews)


def test_color_fix_node_gives_the_reference_colours():
    H.setup_host()
    node = H.pack_module("nodes.color_fix").XPSRColorFix
    image = torch.rand(2, 32, 48, 3) * 0.3
    reference = torch.rand(1, 8, 12, 3) * 0.2 + 0.6
    (fixed,) = node.execute(image, reference, "adain").args
    assert fixed.shape == image.shape
    assert (fixed.mean((1, 2)) - reference.mean((1, 2))).abs().max() < 0.02
    with pytest.raises(ValueError, match="reference has 3 images and image has 2"):
        node.execute(image, torch.rand(3, 8, 8, 3), "adain")
