"""ComfyUI's own server and frontend load every example workflow as a new user sees it: no alert, toast,
dialog, console error, page error, failed request, missing or broken node; in the frontend ComfyUI pins
and in the newest one.

Runs where COMFYUI_PATH, Debian's Chromium and playwright exist (skips with the reason otherwise); the
newest frontend's build directory comes from XPSR_NEWEST_FRONTEND (its tests skip when that is unset).
Screenshots go to tests/output/browser/<frontend>-<workflow>.png.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import browser
import record_api_workflows

REASON = browser.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

WORKFLOWS = sorted((browser.REPO / "workflows").glob("*.json"))
SCREENSHOTS = browser.REPO / "tests" / "output" / "browser"
# The files the README tells a user to download, as the workflows name them.
MODEL_FILES = ("checkpoints/v1-5-pruned-emaonly.safetensors", "xpsr/xpsr_fp16.safetensors",
               "text_encoders/qwen3vl_8b_fp8_scaled.safetensors")
BLUEPRINT = "XPSR Upscale"
blueprints = pytest.mark.host_feature(
    "node packs' subgraph blueprints (app/subgraph_manager.py, ComfyUI 0.33)",
    REASON is not None or (Path(os.environ["COMFYUI_PATH"]) / "app" / "subgraph_manager.py").is_file())

# A fresh, offline ComfyUI install, whatever the frontend.
OFFLINE_HOST = browser.Ignored(
    requests=(
        "/user.css", "/api/userdata/user.css",  # no user stylesheet
        "/favicon.ico",  # ComfyUI serves none
        "/api/userdata?dir=workflows&", "/api/userdata?dir=subgraphs",  # no saved workflows or subgraphs yet
        "/api/userdata/comfy.templates.json",  # no saved templates yet
        "https://api.comfy.org/releases",  # the update check, offline
        "https://huggingface.co/Comfy-Org/z_image_turbo/",  # newer frontends' default graph's model check, offline
    ),
)
# What frontends report on startup whatever the page loads.
FRONTEND_STARTUP = browser.Ignored(
    # 1.27.10: a settings onChange (browser_check.md, pitfall 4); 1.49.6: its settings store
    page_errors=("Cannot read properties of undefined (reading 'id')",),
    console_errors=("ComfyApp graph accessed before initialization",),
)
# Routes newer frontends call that older hosts (ComfyUI 0.3.64) do not have (404), and what frontends log about them.
ROUTES_THE_HOST_LACKS = browser.Ignored(
    requests=(
        "/api/jobs?",  # the jobs API (queue and history)
        "/api/global_subgraphs",  # blueprint subgraphs
    ),
    console_errors=(
        "[Jobs API] Error fetching jobs: JobsApiError: Failed to fetch jobs: 404",
        "Failed to fetch queue: JobsApiError: Failed to fetch jobs: 404",
    ),
)


def host_problems(url: str) -> browser.Ignored:
    """What the server at ``url`` and its frontend report that is not the pack's doing."""
    try:
        urllib.request.urlopen(f"{url}/api/jobs?limit=1")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return OFFLINE_HOST + FRONTEND_STARTUP + ROUTES_THE_HOST_LACKS
    return OFFLINE_HOST + FRONTEND_STARTUP


@pytest.fixture(scope="module")
def server(frontend, front_end_root, tmp_path_factory):
    with browser.comfy_server(tmp_path_factory.mktemp(f"comfy_base_{frontend}"), front_end_root, MODEL_FILES) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with browser.chromium_page(server, host_problems(server)) as page:
        yield page


def test_server_lists_the_pack_and_its_workflows(server):
    object_info = json.load(urllib.request.urlopen(f"{server}/object_info"))
    assert {"XPSRLoader", "XPSRDualPromptEncode", "XPSRApply", "XPSRSampler", "XPSRCaption"} <= set(object_info)
    templates = json.load(urllib.request.urlopen(f"{server}/api/workflow_templates"))
    assert sorted(templates["comfyui-xpsr"]) == sorted(w.stem for w in WORKFLOWS)


def test_the_frontend_starts_without_problems(page, front_end_root):
    assert page.version == browser.frontend_version(front_end_root)
    assert page.startup == {"toasts": [], "problems": []}


PROMPTS = ["high_level", "low_level", "added_prompt", "negative_high", "negative_low"]
CLEAN = {"missing": [], "unregistered": [], "broken": [], "dialogs": [], "errors": [], "toasts": [], "problems": [],
         "cramped": [], "truncated": []}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_without_problems(page, frontend, path: Path):
    """Nothing goes wrong, and every node is at least as large as the frontend needs to show all of its widgets
    and every widget's label and value in full."""
    report = browser.load_workflow(page, json.loads(path.read_text()))
    assert report == CLEAN
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{frontend}-{path.stem}.png"
    browser.screenshot(page.page, shot)
    assert shot.stat().st_size > 10_000


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_prompt_box_is_labelled_while_filled(page, path: Path):
    """Each prompt box the frontend shows names its prompt; a box whose input is linked may be hidden."""
    workflow = json.loads(path.read_text())
    encode = next(n for n in workflow["nodes"] if n["type"] == "XPSRDualPromptEncode")
    encode["widgets_values"][:len(PROMPTS)] = [f"typed {name}" for name in PROMPTS]
    linked = {i["name"] for i in encode["inputs"] if i.get("link") is not None}
    browser.load_workflow(page, workflow)
    labels = browser.prompt_labels(page.page)
    assert {name: labels.get(name) for name in PROMPTS if name not in linked} == {
        name: name for name in PROMPTS if name not in linked}
    assert all(labels.get(name) in (None, name) for name in linked)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_api_workflow_is_this_frontends_conversion_of_the_workflow(page, path: Path):
    """workflows/api/<name>.json is the prompt the Queue button sends for workflows/<name>.json."""
    browser.load_workflow(page, json.loads(path.read_text()))
    assert page.page.evaluate(record_api_workflows.CONVERT) == json.loads(
        (record_api_workflows.API / path.name).read_text())


def test_a_missing_node_is_detected(page):
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "XPSRDoesNotExist"
    report = browser.load_workflow(page, workflow)
    assert "XPSRDoesNotExist" in json.dumps(report["missing"]) and report["unregistered"] == ["XPSRDoesNotExist"]


def test_a_workflow_the_frontend_rejects_is_detected(page):
    """Null where the frontend's workflow schema expects a list: its zod alert."""
    workflow = json.loads(WORKFLOWS[0].read_text()) | {"floatingLinks": None}
    assert "Invalid workflow against zod schema" in "".join(browser.load_workflow(page, workflow)["toasts"])


def test_toasts_and_alerts_are_detected(page):
    page.page.evaluate("""() => {
        app.extensionManager.toast.add({severity: 'error', summary: 'XPSR test toast', detail: 'shown'});
        setTimeout(() => window.alert('XPSR test alert'));
    }""")
    page.page.wait_for_timeout(500)
    assert [toast for toast in browser.take_toasts(page.page) if "XPSR test toast" in toast]
    assert page.problems.take() == ["native alert: XPSR test alert"]


@blueprints
def test_the_server_lists_the_packs_blueprint(server):
    listed = json.load(urllib.request.urlopen(f"{server}/api/global_subgraphs")).values()
    assert [(e["name"], e["info"]["node_pack"]) for e in listed if e["source"] == "custom_node"] == [
        (BLUEPRINT, "custom_nodes.comfyui-xpsr")]


@blueprints
def test_the_blueprint_is_placed_from_the_node_library_with_no_missing_node(page):
    """On an empty canvas, from the node library: one XPSR Upscale node with its widgets, whose subgraph holds the
    three XPSR nodes, all registered and unbroken."""
    page.page.evaluate("() => app.graph.clear()")
    placed = browser.place_from_node_library(page, BLUEPRINT)
    assert placed == {"nodes": [{"type": placed["nodes"][0]["type"], "title": BLUEPRINT, "subgraph": True, "widgets": [
        "xpsr_model", "high_level", "low_level", "scale", "steps", "cfg", "color_fix", "seed"]}],
        "toasts": [], "problems": []}
    inner = page.page.evaluate("""() => app.graph.nodes[0].subgraph.nodes.map(n => ({type: n.type,
        registered: n.type in LiteGraph.registered_node_types, broken: Boolean(n.has_errors)}))""")
    assert sorted(n["type"] for n in inner) == ["XPSRDualPromptEncode", "XPSRLoader", "XPSRSampler"]
    assert all(n["registered"] and not n["broken"] for n in inner)


@blueprints
def test_the_blueprints_prompt_validates_on_the_server(page, server):
    """The blueprint fed by Load Checkpoint and Load Image into Save Image, expanded into its nodes as the frontend
    converts a graph for the queue: ComfyUI validates the prompt (queued for a client that is not this page, so
    the run, which fails on the empty stand-in checkpoint, shows nothing here)."""
    page.page.evaluate("() => app.graph.clear()")
    browser.place_from_node_library(page, BLUEPRINT)
    prompt = page.page.evaluate("""async () => {
        const upscale = app.graph.nodes[0];
        const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
        const checkpoint = add("CheckpointLoaderSimple", [0, 0]), image = add("LoadImage", [0, 300]);
        const save = add("SaveImage", [1200, 0]);
        const slot = name => upscale.inputs.findIndex(i => i.name === name);
        checkpoint.connect(0, upscale, slot("model"));
        checkpoint.connect(1, upscale, slot("clip"));
        checkpoint.connect(2, upscale, slot("vae"));
        image.connect(0, upscale, slot("image"));
        upscale.connect(0, save, 0);
        for (const [name, text] of [["high_level", "a red brick wall"], ["low_level", "blurry and noisy"]])
            upscale.widgets.find(w => w.name === name).value = text;
        return (await app.graphToPrompt()).output;
    }""")
    assert sorted(node["class_type"] for node in prompt.values()) == [
        "CheckpointLoaderSimple", "LoadImage", "SaveImage", "XPSRDualPromptEncode", "XPSRLoader", "XPSRSampler"]
    encode = next(node for node in prompt.values() if node["class_type"] == "XPSRDualPromptEncode")
    assert (encode["inputs"]["high_level"], encode["inputs"]["low_level"]) == ("a red brick wall", "blurry and noisy")
    request = urllib.request.Request(f"{server}/prompt", json.dumps({"prompt": prompt,
                                                                     "client_id": "xpsr-test-validation"}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        answer = json.load(urllib.request.urlopen(request))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e}: {e.read().decode()}") from e
    assert answer["node_errors"] == {} and answer["prompt_id"]
    assert page.problems.take() == [] and browser.take_toasts(page.page) == []

