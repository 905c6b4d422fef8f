"""Each shipped workflow run as a user runs it, in ComfyUI's own frontend: loaded, its loaders pointed at the
user's model files (tests/user_models.py), the LR image uploaded with Load Image's upload button, Run pressed, and
the restored image waited for on the page; in the pinned frontend and the newest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import comfy_host  # skips this module without COMFYUI_PATH

import browser
import user_models as U
from test_browser_workflows import CLEAN, MODEL_FILES, REASON, WORKFLOWS, host_problems

pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

DATASET = "xpsr_dataset"
"""The dataset folder (in ComfyUI's input folder) the caption-files workflow reads."""
OUTPUT_SIDE = {"xpsr_caption_files": 64, "xpsr_chained_ksampler": 128, "xpsr_comfy_vlm_captions": 64,
               "xpsr_large_image_tiles": 64, "xpsr_manual_prompts": 64, "xpsr_mllm_captions": 64,
               "xpsr_tile_captions": 64}
"""The LR image (32 px) x the scale set below (2), or x the Upscale Image By node (4) of the KSampler workflow."""

POINT_AT_USER_FILES = """(files) => {
    const settings = {ckpt_name: files.checkpoint, xpsr_model: files.xpsr, steps: 3, process_size: 64,
                      max_new_tokens: 4};
    for (const node of app.graph.nodes) for (const widget of node.widgets || []) {
        if (widget.name in settings) widget.value = settings[widget.name];
        if (["XPSRSampler", "XPSRTileGrid"].includes(node.type) && widget.name === "scale") widget.value = 2;
        if (node.type === "XPSRMLLMLoader" && widget.name === "model") widget.value = files.llm;
    }
}"""
"""What a user changes: the model files, and (for the CPU) fewer steps and tokens, a smaller processing size."""
TINY_VLM_FOR_LOAD_CLIP = """() => {
    const load = app.graph.nodes.find(n => n.type === "CLIPLoader");
    if (!load) return;
    const tiny = LiteGraph.createNode("XPSRTestTinyQwen3VL");
    tiny.pos = load.pos;
    app.graph.add(tiny);
    for (const id of load.outputs[0].links || []) {
        const link = app.graph.links[id] ?? app.graph.links.get(id);
        tiny.connect(0, app.graph.getNodeById(link.target_id), link.target_slot);
    }
    app.graph.remove(load);
}"""
"""A test server cannot load a real Qwen3-VL file: the tiny one (tests/tiny_vlm_pack) takes Load CLIP's place."""
SHOWN = """() => app.graph.nodes.filter(n => n.type === "SaveImage")
    .flatMap(n => (n.imgs || []).map(i => i.naturalWidth)).filter(width => width > 0)"""
"""The widths of the images the Save Image nodes show (the frontend loads a node's images when it draws it)."""


@pytest.fixture(scope="module")
def lr_image(tmp_path_factory) -> Path:
    return U.write_lr_photo(tmp_path_factory.mktemp("lr") / "lr.png")


@pytest.fixture(scope="module")
def server(frontend, front_end_root, lr_image: Path, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"comfy_user_{frontend}")
    models = U.write_user_models(base / "models")
    dataset = base / "input" / DATASET
    (dataset / "LR").mkdir(parents=True)
    (dataset / "LR" / lr_image.name).write_bytes(lr_image.read_bytes())
    for folder, caption in (("highlevel_prompt", "an astronaut in a white suit"), ("lowlevel_prompt_q", "blurry")):
        (dataset / folder).mkdir()
        (dataset / folder / f"{lr_image.stem}.txt").write_text(caption + "\n")
    with browser.comfy_server(base, front_end_root, MODEL_FILES, packs=[comfy_host.TINY_VLM_PACK]) as url:
        yield url, models


@pytest.fixture(scope="module")
def page(server):
    with browser.chromium_page(server[0], host_problems(server[0])) as page:
        yield page


@pytest.mark.parametrize("path", [
    pytest.param(path, id=path.stem, marks=[comfy_host.text_generation] if path.stem == "xpsr_comfy_vlm_captions"
                 else []) for path in WORKFLOWS])
def test_the_workflow_runs_from_the_run_button_and_shows_the_restored_image(page, server, lr_image: Path,
                                                                            path: Path):
    models = server[1]
    assert browser.load_workflow(page, json.loads(path.read_text())) == CLEAN
    page.page.evaluate(POINT_AT_USER_FILES, {"checkpoint": models.checkpoint, "xpsr": models.xpsr,
                                             "llm": models.llm})
    page.page.evaluate(TINY_VLM_FOR_LOAD_CLIP)
    if any(node["type"] == "LoadImage" for node in json.loads(path.read_text())["nodes"]):
        with page.page.expect_file_chooser() as chooser:
            page.page.evaluate("""() => app.graph.nodes.find(n => n.type === "LoadImage").widgets
                .find(w => w.name === "upload").callback()""")
        chooser.value.set_files(str(lr_image))
        page.page.wait_for_function("""(name) => app.graph.nodes.find(n => n.type === "LoadImage").widgets
            .find(w => w.name === "image").value === name""", arg=lr_image.name)
    page.page.evaluate(browser.FIT_VIEW)  # the whole graph in view, Save Image included, as a user watches it
    page.page.get_by_role("button", name="Run", exact=True).first.click()
    page.page.wait_for_function(f"() => ({SHOWN})().length > 0", timeout=120_000)
    assert page.page.evaluate(SHOWN) == [OUTPUT_SIDE[path.stem]]
    assert page.problems.take() == [] and browser.take_toasts(page.page) == []
