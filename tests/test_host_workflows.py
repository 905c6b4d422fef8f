"""Every example workflow converts to an API prompt that ComfyUI validates and runs, with tiny models swapped in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import comfy_host as H  # skips this module without COMFYUI_PATH

WORKFLOWS = sorted((H.REPO / "workflows").glob("*.json"))
LLM = "llava-hf/llava-tiny"
LR_SIDE = 136
TILE = 32


@pytest.fixture(scope="module")
def input_image() -> str:
    """An LR photo in ComfyUI's input folder."""
    from PIL import Image
    from skimage import data

    H.setup_host()
    name = "xpsr_test_lr.png"
    Image.fromarray(data.astronaut()).resize((LR_SIDE, LR_SIDE), Image.BICUBIC).save(
        Path(H.folder_paths.get_input_directory()) / name)
    return name


@pytest.fixture(scope="module")
def captioned_dataset(input_image: str) -> str:
    """The LR photo with caption files in the official layout, in ComfyUI's output folder (an allowed one)."""
    dataset = Path(H.folder_paths.get_output_directory()) / "xpsr_test_dataset"
    (dataset / "LR").mkdir(parents=True, exist_ok=True)
    (dataset / "LR" / input_image).write_bytes((Path(H.folder_paths.get_input_directory()) / input_image).read_bytes())
    for folder, caption in (("highlevel_prompt", "an astronaut in a white suit"), ("lowlevel_prompt_q", "blurry")):
        (dataset / folder).mkdir(exist_ok=True)
        (dataset / folder / f"{Path(input_image).stem}.txt").write_text(caption + "\n")
    return str(dataset)


@pytest.fixture(scope="module")
def tiny_llm():
    pytest.importorskip("transformers")
    import tiny_vlm

    base = H.WORK / "models_llm"
    if not (base / LLM).is_dir():
        tiny_vlm.build_llava(base / LLM)
    H.folder_paths.folder_names_and_paths["LLM"] = ([str(base)], set())


def with_tiny_models(prompt: dict, image: str, dataset: str) -> dict:
    """The real files a user would have, replaced by the test's tiny models and image (or captioned dataset); fewer
    steps and tokens for the CPU, and tiles shrunk with the image so that the tiled workflow still tiles."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"], node["inputs"] = "XPSRTestTinySD15", {}
        elif node["class_type"] == "CLIPLoader":
            node["class_type"], node["inputs"] = "XPSRTestTinyQwen3VL", {}
        elif node["class_type"] == "XPSRLoader":
            inputs["xpsr_model"] = H.XPSR_FILE
        elif node["class_type"] == "XPSRMLLMLoader":
            inputs |= {"model": LLM, "dtype": "fp32"}
        elif node["class_type"] == "LoadImage":
            inputs["image"] = image
        elif node["class_type"] == "XPSRLoadCaptionedImages":
            inputs["dataset"] = dataset
        if "steps" in inputs:
            inputs["steps"] = 2
        if "max_new_tokens" in inputs:
            inputs["max_new_tokens"] = 6
        if inputs.get("tile_size", 320) < 320:
            inputs["tile_size"] = TILE
    return prompt


def test_there_are_the_seven_example_workflows():
    assert [w.stem for w in WORKFLOWS] == ["xpsr_caption_files", "xpsr_chained_ksampler", "xpsr_comfy_vlm_captions",
                                          "xpsr_large_image_tiles", "xpsr_manual_prompts", "xpsr_mllm_captions",
                                          "xpsr_tile_captions"]
    assert all(w.with_suffix(".jpg").is_file() for w in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_as_saved(path: Path, input_image: str):
    prompt = H.ui_to_api(json.loads(path.read_text()))
    assert any(n["class_type"].startswith("XPSR") for n in prompt.values())
    for node in prompt.values():
        if node["class_type"] == "LoadImage":
            node["inputs"]["image"] = input_image
    valid = H.asyncio.run(H.execution.validate_prompt("v", prompt, None))
    errors = {k: [e["message"] for e in v["errors"]] for k, v in valid[3].items()}
    unknown_files = {"Value not in list"}
    assert all(set(msgs) <= unknown_files for msgs in errors.values()), errors


@pytest.mark.parametrize("path", [
    pytest.param(path, id=path.stem, marks=[H.text_generation] if path.stem == "xpsr_comfy_vlm_captions" else [])
    for path in WORKFLOWS])
def test_workflow_runs_with_tiny_models(path: Path, input_image: str, captioned_dataset: str, tiny_llm):
    prompt = with_tiny_models(H.ui_to_api(json.loads(path.read_text())), input_image, captioned_dataset)
    executor, _ = H.run_ok(prompt)
    saved = [n for n, node in prompt.items() if node["class_type"] == "SaveImage"]
    images = executor.history_result["outputs"][saved[0]]["images"]
    assert len(images) == 1
    from PIL import Image

    output = Path(H.folder_paths.get_output_directory()) / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(output) as out:
        assert out.size == (LR_SIDE * 4, LR_SIDE * 4)
