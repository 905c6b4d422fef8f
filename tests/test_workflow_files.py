"""The example workflow files as saved: loadable by every frontend and laid out legibly, checked without ComfyUI.

ComfyUI frontend 1.27.10 (the one ComfyUI 0.3.64 pins) rejects null where its workflow schema expects a
value (``floatingLinks``, ``definitions``, a slot's ``slot_index``, ...) with an "Invalid workflow against zod
schema" alert, so the files store no null at all: absent keys mean the same to every frontend.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from render_workflow_thumbnails import thumbnail_size

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


def null_paths(value: object, path: str = "") -> list[str]:
    """Where ``value`` holds null, as JSON paths."""
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in null_paths(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in null_paths(item, f"{path}[{i}]")]
    return []


def box(node: dict) -> tuple[float, float, float, float]:
    """A node's box on the canvas (x0, y0, x1, y1), title bar included."""
    (x, y), (width, height) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + width, y + height


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_there_are_workflows():
    assert len(WORKFLOWS) == 7


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_stores_no_null(path: Path):
    assert null_paths(json.loads(path.read_text())) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_two_nodes_overlap(path: Path):
    nodes = json.loads(path.read_text())["nodes"]
    assert [(a["type"], b["type"]) for a, b in combinations(nodes, 2) if overlap(box(a), box(b))] == []


def test_overlap_counts_the_title_bar():
    below = {"pos": [0, 0], "size": [100, 50]}
    assert not overlap(box(below), box({"pos": [0, 50 + TITLE_HEIGHT], "size": [100, 50]}))
    assert overlap(box(below), box({"pos": [0, 50 + TITLE_HEIGHT - 1], "size": [100, 50]}))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_thumbnail_is_rendered_from_the_current_layout(path: Path):
    """The thumbnail's size follows from the layout: when a re-layout changes it, the thumbnail is stale (re-render
    it with tests/render_workflow_thumbnails.py)."""
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == thumbnail_size(json.loads(path.read_text()))


def test_every_workflow_has_its_api_prompt_and_no_other_is_shipped():
    api = sorted((WORKFLOWS[0].parent / "api").glob("*.json"))
    assert [p.name for p in api] == [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_api_prompt_names_the_same_nodes_as_the_workflow(path: Path):
    """Every executable node of the workflow (Notes are the frontend's alone) is in its API prompt, by id and type."""
    workflow = json.loads(path.read_text())
    prompt = json.loads((path.parent / "api" / path.name).read_text())
    assert {node_id: node["class_type"] for node_id, node in prompt.items()} == {
        str(n["id"]): n["type"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert null_paths(prompt) == []
