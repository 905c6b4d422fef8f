"""Saved workflows keep loading: node ids, input names, types and widget order only ever grow.

``node_schemas.json`` records the released interface. A node or input that disappears or
changes type fails here, and so does a widget inserted before existing ones (saved UI
workflows store widget values by position). The test only compares; to record a deliberate
addition, run the recording command and commit the file it writes:

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_node_schemas.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import comfy_host as H  # skips this module without COMFYUI_PATH

GOLDEN = Path(__file__).parent / "node_schemas.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def interface(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, (kind, *_) in spec.get(section, {}).items():
            inputs[name] = "COMBO" if isinstance(kind, list) else kind
    return {"inputs": inputs, "widgets": [n for n, k in inputs.items() if k in WIDGET_TYPES],
            "outputs": list(node_class.RETURN_TYPES)}


def current() -> dict:
    H.setup_host()
    return {node_id: interface(cls) for node_id, cls in sorted(H.nodes.NODE_CLASS_MAPPINGS.items())
            if node_id.startswith("XPSR") and not node_id.startswith("XPSRTest")}


def test_node_interfaces_only_grow():
    now = current()
    released = json.loads(GOLDEN.read_text())
    for node_id, old in released.items():
        assert node_id in now, f"node {node_id} disappeared; saved workflows use it"
        new = now[node_id]
        for name, kind in old["inputs"].items():
            assert name in new["inputs"], f"{node_id}: input '{name}' disappeared"
            assert new["inputs"][name] == kind, \
                f"{node_id}: input '{name}' changed type {kind} -> {new['inputs'][name]}"
        assert new["widgets"][:len(old["widgets"])] == old["widgets"], (
            f"{node_id}: widgets {new['widgets']} no longer start with {old['widgets']}; add new widgets at the end")
        assert new["outputs"][:len(old["outputs"])] == old["outputs"], f"{node_id}: outputs changed"


def test_every_node_has_a_description_and_every_input_and_output_a_tooltip():
    H.setup_host()
    for node_id in current():
        node = H.nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = node.GET_SCHEMA()
        assert schema.description, f"{node_id} has no description"
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}: input '{item.id}' has no tooltip"
        # OUTPUT_TOOLTIPS is what ComfyUI's /object_info sends the frontend, one per output
        for item, tooltip in zip(schema.outputs, node.OUTPUT_TOOLTIPS, strict=True):
            assert tooltip, f"{node_id}: output '{item.display_name}' has no tooltip"


@pytest.mark.parametrize("node_id", ["XPSRLoader", "XPSRSampler", "XPSRDualPromptEncode", "XPSRApply"])
def test_the_guard_knows_the_core_nodes(node_id: str):
    assert node_id in json.loads(GOLDEN.read_text())
