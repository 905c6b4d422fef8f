"""MLLM captioning in ComfyUI: captions feed XPSR Dual Prompt Encode, the MLLM is a managed model, interrupts stop it.

On a shared server a queued workflow reaches only the dataset folders and the model code the server's owner allows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="MLLM captioning needs transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

import comfy_host as H  # noqa: E402  (skips this module without COMFYUI_PATH)

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402

import tiny_vlm  # noqa: E402
from xpsr_core.captioning import captions as caption_files  # noqa: E402

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


def caption_graph(model: str = MODELS["llava"], batch: int = 2, keep_loaded: bool = False, tokens: int = 6,
                  trust_remote_code: bool = False, **settings) -> dict:
    """Tiny MLLM captions feeding the tiny XPSR graph; ``settings`` are XPSR Caption's optional inputs."""
    prompt = H.graph(height=16, width=16, batch=batch, scale=2.0, seed=tokens)
    prompt |= {
        "20": {"class_type": "XPSRMLLMLoader", "inputs": {"model": model, "dtype": "fp32",
                                                           "trust_remote_code": trust_remote_code}},
        "21": {"class_type": "XPSRCaption", "inputs": {
            "mllm": ["20", 0], "image": ["4", 0], "high_level_instruction": "Describe the content.",
            "low_level_instruction": "Describe the quality.", "max_new_tokens": tokens, "keep_loaded": keep_loaded,
            **settings}},
    }
    prompt["3"]["inputs"] |= {"high_level": ["21", 0], "low_level": ["21", 1]}
    return prompt


def mllm_loaded() -> bool:
    return any(type(m.model.model).__name__ == "_MovableModel" for m in mm.current_loaded_models)


@pytest.mark.parametrize("kind", list(MODELS))
def test_captions_feed_dual_prompt_encode_one_per_image(kind: str):
    if kind == "qwen2_vl" and tiny_vlm.qwen2_vl_unavailable():
        pytest.skip(tiny_vlm.qwen2_vl_unavailable())
    executor, _ = H.run_ok(caption_graph(MODELS[kind], batch=2))
    high = H.outputs(executor, "21")[0]
    low = H.outputs(executor, "21")[1]
    assert len(high) == len(low) == 2 and all(isinstance(c, str) and c for c in high + low)
    positive = H.output(executor, "3")
    assert positive[0][0].shape[0] == 2
    assert H.output(executor, "5").shape == (2, 32, 32, 3)


def test_captions_are_deterministic():
    first, _ = H.run_ok(caption_graph(tokens=5))
    again, _ = H.run_ok(caption_graph(tokens=5))
    assert H.outputs(first, "21")[0] == H.outputs(again, "21")[0]


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


def make_dataset(root: Path, count: int = 2) -> Path:
    """<root>/LR/img<i>.png, small generated pictures."""
    (root / "LR").mkdir(parents=True)
    for i in range(count):
        H.pack_module("nodes.caption").to_pil(H.test_image(24, 24, seed=i)[0]).save(root / "LR" / f"img{i}.png")
    return root


def dataset_prompt(dataset: str, overwrite: bool = False, tokens: int = 4) -> dict:
    return {
        "20": {"class_type": "XPSRMLLMLoader", "inputs": {"model": MODELS["llava"], "dtype": "fp32",
                                                           "trust_remote_code": False}},
        "22": {"class_type": "XPSRCaptionDataset", "inputs": {
            "mllm": ["20", 0], "dataset": dataset, "overwrite": overwrite,
            "high_level_instruction": "Describe the content.", "low_level_instruction": "Describe the quality.",
            "max_new_tokens": tokens, "keep_loaded": False}},
    }


def caption_files_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*.txt"))


@pytest.fixture
def no_owner_settings(monkeypatch):
    """A server whose owner has allowed nothing beyond ComfyUI's own folders."""
    monkeypatch.delenv("XPSR_DATASET_DIRS", raising=False)
    monkeypatch.delenv("XPSR_ALLOW_REMOTE_CODE", raising=False)


@pytest.fixture
def output_dir() -> Path:
    H.setup_host()
    return Path(H.folder_paths.get_output_directory())


def test_dataset_is_captioned_once_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("XPSR_DATASET_DIRS", os.pathsep.join([str(tmp_path / "elsewhere"), str(tmp_path / "data")]))
    dataset = make_dataset(tmp_path / "data" / "set")
    prompt = dataset_prompt(str(dataset))
    executor, _ = H.run_ok(prompt)
    assert H.output(executor, "22") == f"captioned 2 of 2 LR images in {dataset}"
    paths = caption_files.caption_paths(dataset / "LR" / "img0.png")
    assert paths.high_level.parent.name == "highlevel_prompt" and paths.low_level.parent.name == "lowlevel_prompt_q"
    assert caption_files.read_caption(paths.high_level) and caption_files.read_caption(paths.low_level)
    prompt["22"]["inputs"]["max_new_tokens"] = 5
    executor, _ = H.run_ok(prompt)
    assert H.output(executor, "22") == f"captioned 0 of 2 LR images in {dataset}"


def test_a_relative_dataset_is_found_in_comfyuis_input_folder(tmp_path, monkeypatch, no_owner_settings):
    monkeypatch.setattr(H.folder_paths, "input_directory", str(tmp_path / "input"))
    dataset = make_dataset(tmp_path / "input" / "sets" / "mine", count=1)
    executor, _ = H.run_ok(dataset_prompt("sets/mine", tokens=6))
    assert H.output(executor, "22") == f"captioned 1 of 1 LR images in {dataset}"
    assert len(caption_files_under(dataset)) == 2


def test_a_dataset_in_comfyuis_output_folder_is_allowed(output_dir, no_owner_settings):
    dataset = make_dataset(output_dir / "captioned_set", count=1)
    executor, _ = H.run_ok(dataset_prompt(str(dataset), tokens=7))
    assert H.output(executor, "22") == f"captioned 1 of 1 LR images in {dataset}"


def test_caption_files_that_exist_are_kept_unless_overwrite(output_dir, no_owner_settings):
    dataset = make_dataset(output_dir / "half_captioned_set", count=1)
    paths = caption_files.caption_paths(dataset / "LR" / "img0.png")
    caption_files.write_caption(paths.high_level, "a caption from the official script")
    H.run_ok(dataset_prompt(str(dataset), tokens=8))
    assert caption_files.read_caption(paths.high_level) == "a caption from the official script"
    assert caption_files.read_caption(paths.low_level)
    H.run_ok(dataset_prompt(str(dataset), overwrite=True, tokens=8))
    assert caption_files.read_caption(paths.high_level) != "a caption from the official script"


def outside_dataset(outside: Path, output_dir: Path, case: str) -> str:
    """How a queued workflow might name a dataset that lies outside the allowed folders."""
    if case == "absolute":
        return str(outside)
    if case == "dotdot":
        return os.path.relpath(outside, H.folder_paths.get_input_directory())
    link = output_dir / f"link_to_{outside.parent.name}"
    link.symlink_to(outside, target_is_directory=True)
    return str(link)


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink"])
def test_a_dataset_outside_the_allowed_folders_is_refused_and_the_server_keeps_serving(
        case: str, tmp_path, output_dir, no_owner_settings):
    outside = make_dataset(tmp_path / "private" / "set", count=1)
    dataset = outside_dataset(outside, output_dir, case)
    executor, _ = H.run(dataset_prompt(dataset))
    message = H.error_message(executor)
    assert not executor.success
    assert f"dataset {dataset!r} resolves to {outside}, outside the folders datasets may live in" in message
    assert str(output_dir) in message and "XPSR_DATASET_DIRS" in message
    assert caption_files_under(tmp_path) == []
    H.run_ok(dataset_prompt(str(make_dataset(output_dir / f"next_{case}", count=1)), tokens=9))


def test_writing_never_follows_a_symlink_out_of_the_allowed_folder(tmp_path, output_dir, no_owner_settings):
    dataset = make_dataset(output_dir / "set_with_linked_captions", count=1)
    (tmp_path / "private").mkdir()
    (dataset / "highlevel_prompt").symlink_to(tmp_path / "private", target_is_directory=True)
    executor, _ = H.run(dataset_prompt(str(dataset)))
    message = H.error_message(executor)
    assert not executor.success
    assert f"resolves to {tmp_path / 'private' / 'img0.txt'}, outside the folders datasets may live in" in message
    assert caption_files_under(tmp_path) == [] and caption_files_under(dataset) == []


def test_an_lr_image_linked_from_outside_is_refused(tmp_path, output_dir, no_owner_settings):
    outside = make_dataset(tmp_path / "private", count=1)
    dataset = make_dataset(output_dir / "set_with_linked_image", count=1)
    (dataset / "LR" / "img1.png").symlink_to(outside / "LR" / "img0.png")
    executor, _ = H.run(dataset_prompt(str(dataset)))
    assert not executor.success
    assert f"LR image '{dataset / 'LR' / 'img1.png'}' resolves to {outside / 'LR' / 'img0.png'}" in (
        H.error_message(executor))


def test_remote_code_runs_only_where_the_server_allows_it(llm_folder, monkeypatch, no_owner_settings):
    marker = H.WORK / "remote_code_ran"
    tiny_vlm.build_remote_code_llava(llm_folder / "tiny" / "remote-llava", marker)
    prompt = caption_graph("tiny/remote-llava", batch=1, tokens=5, trust_remote_code=True)
    executor, _ = H.run(prompt)
    assert not executor.success
    assert "XPSR_ALLOW_REMOTE_CODE=1" in H.error_message(executor)
    assert not marker.exists()
    H.run_ok(caption_graph(tokens=12))

    monkeypatch.setenv("XPSR_ALLOW_REMOTE_CODE", "1")
    executor, _ = H.run_ok(prompt)
    assert marker.exists()
    assert [len(c) > 0 for c in H.outputs(executor, "21")[0] + H.outputs(executor, "21")[1]] == [
        True, True]


def test_missing_model_folder_is_a_clear_error(llm_folder):
    """Listed when the prompt was validated, gone when it runs (hosts that validate combo values refuse a name
    that is no longer listed before this)."""
    gone = llm_folder / "gone" / "model"
    shutil.copytree(llm_folder / MODELS["llava"], gone)
    prompt = caption_graph()
    prompt["20"]["inputs"]["model"] = "gone/model"
    valid = H.validate(prompt)
    shutil.rmtree(gone.parent)
    executor, _ = H.run(prompt, valid)
    assert not executor.success and "MLLM folder 'gone/model' not found" in H.error_message(executor)


def test_out_of_memory_halves_the_batch_then_is_reported_with_what_to_try(monkeypatch):
    batches = []

    def out_of_memory(self, **kwargs):
        batches.append(kwargs["input_ids"].shape[0])
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "generate", out_of_memory)
    executor, _ = H.run(caption_graph(tokens=11))
    message = H.error_message(executor)
    assert batches == [4, 2]
    assert not executor.success
    assert "out of memory while captioning with llava-tiny, even one image at a time" in message
    assert "dtype fp16 or bf16" in message
    assert not mllm_loaded()


def test_a_batch_captions_as_one_image_at_a_time():
    """XPSR Caption alone (the graph around it is tested above): three images in one padded batch or one by one."""
    caption = H.pack_module("nodes.caption")
    mllm = caption.load_mllm(MODELS["llava"], "fp32", False)
    images = H.test_image(24, 24, batch=3)

    def captions(batch_size: int) -> tuple:
        return tuple(caption.XPSRCaption.execute(images, "Describe the content.", "Describe the quality.", 13, False,
                                                 batch_size=batch_size, mllm=mllm).result)

    batched = captions(3)
    assert batched == captions(1) and [len(c) for c in batched] == [3, 3]


def test_low_level_decoding_settings_reach_generate(monkeypatch):
    calls = []
    generate = transformers.LlavaForConditionalGeneration.generate

    def spy(self, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("num_beams", "repetition_penalty", "length_penalty",
                                                 "max_new_tokens")} | {"sequences": kwargs["input_ids"].shape[0]})
        return generate(self, **kwargs)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "generate", spy)
    H.run_ok(caption_graph(tokens=3, low_level_num_beams=2, low_level_repetition_penalty=1.5,
                           low_level_length_penalty=0.5, low_level_max_new_tokens=4))
    assert calls == [
        {"num_beams": 1, "repetition_penalty": 1.0, "length_penalty": None, "max_new_tokens": 3, "sequences": 2},
        {"num_beams": 2, "repetition_penalty": 1.5, "length_penalty": 0.5, "max_new_tokens": 4, "sequences": 2}]
