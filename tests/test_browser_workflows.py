"""ComfyUI's own server and frontend load every example workflow with no missing or broken node.

Runs where COMFYUI_PATH, Debian's Chromium and playwright exist (skips with the reason
otherwise). Screenshots go to tests/output/browser/.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

import browser

REASON = browser.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

WORKFLOWS = sorted((browser.REPO / "workflows").glob("*.json"))
SCREENSHOTS = browser.REPO / "tests" / "output" / "browser"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with browser.comfy_server(tmp_path_factory.mktemp("comfy_base")) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with browser.chromium_page(server) as page:
        yield page


def test_server_lists_the_pack_and_its_workflows(server):
    object_info = json.load(urllib.request.urlopen(f"{server}/object_info"))
    assert {"XPSRLoader", "XPSRDualPromptEncode", "XPSRApply", "XPSRSampler", "XPSRCaption"} <= set(object_info)
    templates = json.load(urllib.request.urlopen(f"{server}/api/workflow_templates"))
    assert sorted(templates["comfyui-xpsr"]) == sorted(w.stem for w in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend_without_missing_nodes(page, path: Path):
    report = browser.load_workflow(page, json.loads(path.read_text()))
    assert report == {"missing": [], "unregistered": [], "broken": [], "dialog": False}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(page, SCREENSHOTS / f"{path.stem}.png")
    assert (SCREENSHOTS / f"{path.stem}.png").stat().st_size > 10_000


def test_a_missing_node_is_detected(page):
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "XPSRDoesNotExist"
    report = browser.load_workflow(page, workflow)
    assert "XPSRDoesNotExist" in json.dumps(report["missing"]) and report["dialog"]
