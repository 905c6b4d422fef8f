"""MLLM captioning in ComfyUI: captions feed XPSR Dual Prompt Encode, the MLLM is a managed model, interrupts stop it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="MLLM captioning needs transformers")

import torch  # noqa: E402

import comfy_host as H  # noqa: E402  (skips this module without COMFYUI_PATH)
import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import tiny_vlm  # noqa: E402
from xpsr_core import captions as caption_files  # noqa: E402

MODELS = {"llava": "llava-hf/llava-tiny", "qwen2_vl": "Qwen/Qwen2-VL-tiny"}


@pytest.fixture(scope="module", autouse=True)
def llm_folder():
    H.setup_host()
    base = H.WORK / "models_llm"
    for kind, name in MODELS.items():
        if not (base / name).is_dir() and not (kind == "qwen2_vl" and tiny_vlm.qwen2_vl_unavailable()):
            tiny_vlm.BUILDERS[kind](base / name)
    H.folder_paths.folder_names_and_paths["LLM"] = ([str(base)], set())
    return base


def caption_graph(model: str = MODELS["llava"], batch: int = 2, keep_loaded: bool = False, tokens: int = 6) -> dict:
    prompt = H.graph(height=16, width=16, batch=batch, scale=2.0, seed=tokens)
    prompt |= {
        "20": {"class_type": "XPSRMLLMLoader", "inputs": {"model": model, "dtype": "fp32",
                                                           "trust_remote_code": False}},
        "21": {"class_type": "XPSRCaption", "inputs": {
            "mllm": ["20", 0], "image": ["4", 0], "high_level_instruction": "Describe the content.",
            "low_level_instruction": "Describe the quality.", "max_new_tokens": tokens, "keep_loaded": keep_loaded}},
    }
    prompt["3"]["inputs"] |= {"high_level": ["21", 0], "low_level": ["21", 1]}
    return prompt


def mllm_loaded() -> bool:
    return any(type(m.model.model).__name__ == "_Holder" for m in mm.current_loaded_models)


@pytest.mark.parametrize("kind", list(MODELS))
def test_captions_feed_dual_prompt_encode_one_per_image(kind: str):
    if kind == "qwen2_vl" and tiny_vlm.qwen2_vl_unavailable():
        pytest.skip(tiny_vlm.qwen2_vl_unavailable())
    executor, _ = H.run_ok(caption_graph(MODELS[kind], batch=2))
    high = executor.caches.outputs.get("21")[0]
    low = executor.caches.outputs.get("21")[1]
    assert len(high) == len(low) == 2 and all(isinstance(c, str) and c for c in high + low)
    positive = H.output(executor, "3")
    assert positive[0][0].shape[0] == 2
    assert H.output(executor, "5").shape == (2, 32, 32, 3)


def test_captions_are_deterministic():
    first, _ = H.run_ok(caption_graph(tokens=5))
    again, _ = H.run_ok(caption_graph(tokens=5))
    assert first.caches.outputs.get("21")[0] == again.caches.outputs.get("21")[0]


@pytest.mark.parametrize("keep_loaded", [False, True])
def test_mllm_is_a_managed_model_while_generating_and_unloaded_after_unless_kept(keep_loaded: bool):
    during = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: during.append(mllm_loaded()))
    try:
        H.run_ok(caption_graph(keep_loaded=keep_loaded, tokens=7 + keep_loaded))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert during and during[0]
    assert mllm_loaded() == keep_loaded
    mm.unload_all_models()
    assert not mllm_loaded()


def test_interrupt_stops_generation_and_the_next_run_works(monkeypatch):
    tokens = []
    original = mm.throw_exception_if_processing_interrupted

    def count_and_interrupt():
        tokens.append(1)
        if len(tokens) == 3:
            mm.interrupt_current_processing(True)
        original()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", count_and_interrupt)
    executor, server = H.run(caption_graph(tokens=40))
    assert not executor.success and any(e == "execution_interrupted" for e, _ in server.messages)
    assert len(tokens) == 3
    monkeypatch.undo()
    H.run_ok(caption_graph(tokens=9))


def test_dataset_is_captioned_once_in_the_official_layout(tmp_path):
    lr = tmp_path / "set" / "LR"
    lr.mkdir(parents=True)
    for i in range(2):
        comfy_image = H.test_image(24, 24, seed=i)[0]
        H.pack_module("nodes.caption").to_pil(comfy_image).save(lr / f"img{i}.png")
    prompt = {
        "20": {"class_type": "XPSRMLLMLoader", "inputs": {"model": MODELS["llava"], "dtype": "fp32",
                                                           "trust_remote_code": False}},
        "22": {"class_type": "XPSRCaptionDataset", "inputs": {
            "mllm": ["20", 0], "dataset": str(tmp_path / "set"), "overwrite": False,
            "high_level_instruction": "Describe the content.", "low_level_instruction": "Describe the quality.",
            "max_new_tokens": 4, "keep_loaded": False}},
    }
    executor, _ = H.run_ok(prompt)
    assert H.output(executor, "22") == f"captioned 2 of 2 LR images in {tmp_path / 'set'}"
    paths = caption_files.caption_paths(lr / "img0.png")
    assert paths.high_level.parent.name == "highlevel_prompt" and paths.low_level.parent.name == "lowlevel_prompt_q"
    assert caption_files.read_caption(paths.high_level) and caption_files.read_caption(paths.low_level)
    prompt["22"]["inputs"]["max_new_tokens"] = 5
    executor, _ = H.run_ok(prompt)
    assert H.output(executor, "22") == f"captioned 0 of 2 LR images in {tmp_path / 'set'}"


def test_missing_model_folder_is_a_clear_error():
    prompt = caption_graph()
    prompt["20"]["inputs"]["model"] = "nowhere/model"
    executor, _ = H.run(prompt)
    assert not executor.success and "MLLM folder 'nowhere/model' not found" in H.error_message(executor)


def test_out_of_memory_is_reported_with_what_to_try(monkeypatch):
    caption = H.pack_module("nodes.caption")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(caption, "caption_image", out_of_memory)
    executor, _ = H.run(caption_graph(tokens=11))
    message = H.error_message(executor)
    assert not executor.success and "out of memory while captioning with llava-tiny" in message
    assert "dtype fp16 or bf16" in message
    assert not mllm_loaded()
