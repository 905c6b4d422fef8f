"""Authors the subgraph blueprint subgraphs/XPSR Upscale.json in ComfyUI's own frontend.

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_blueprint.py

ComfyUI must be one that lists pack blueprints (0.33 and later, with its pinned frontend). In
headless Chromium the frontend builds Load Checkpoint and Load Image feeding XPSR Loader ->
XPSR Dual Prompt Encode -> XPSR Sampler -> Save Image, with a Primitive node on each widget a
user sets most (the two prompts, the XPSR file, scale, steps, cfg, colour fix), converts the
three XPSR nodes to a subgraph, so that its inputs are what crosses into them (MODEL, CLIP,
VAE, IMAGE, those widgets, and the seed, which the frontend adds itself), and keeps the
subgraph node and its definition as the blueprint, in the layout of ComfyUI's own blueprints.
Run it after changing the XPSR nodes' interfaces, check the file with the browser test and
commit it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
NAME = "XPSR Upscale"
BLUEPRINT = TESTS.parent / "subgraphs" / f"{NAME}.json"
CATEGORY = "Image generation and editing/Upscale"
"""Where the node library lists it: beside ComfyUI's own upscale blueprint."""
DESCRIPTION = ("XPSR super-resolution of an SD1.5 model in one node: XPSR Loader, XPSR Dual Prompt Encode and XPSR "
               "Sampler. MODEL, CLIP and VAE come from Load Checkpoint; type the two prompts (what the image shows, "
               "and its quality) or connect XPSR Caption's.")
PROMOTED = {"XPSRDualPromptEncode": ["high_level", "low_level"], "XPSRLoader": ["xpsr_model"],
            "XPSRSampler": ["scale", "steps", "cfg", "color_fix"]}
"""The inner widgets shown on the blueprint node (the frontend adds the seed itself)."""

AUTHOR = """async ([name, description, promoted]) => {
    const graph = app.graph;
    graph.clear();
    const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; graph.add(n); return n; };
    const slot = (node, name) => node.inputs.findIndex(i => i.name === name);
    const checkpoint = add("CheckpointLoaderSimple", [-400, 0]);
    const image = add("LoadImage", [-400, 200]);
    const loader = add("XPSRLoader", [0, 0]);
    const encode = add("XPSRDualPromptEncode", [0, 160]);
    const sampler = add("XPSRSampler", [460, 0]);
    const save = add("SaveImage", [900, 0]);
    checkpoint.connect(0, loader, slot(loader, "model"));
    checkpoint.connect(1, encode, slot(encode, "clip"));
    checkpoint.connect(2, sampler, slot(sampler, "vae"));
    loader.connect(0, sampler, slot(sampler, "model"));
    loader.connect(1, sampler, slot(sampler, "xpsr_controlnet"));
    encode.connect(0, sampler, slot(sampler, "positive"));
    encode.connect(1, sampler, slot(sampler, "negative"));
    image.connect(0, sampler, slot(sampler, "image"));
    sampler.connect(0, save, 0);
    let y = 400;
    for (const inner of [encode, loader, sampler])  // a widget fed from outside becomes a widget of the subgraph node
        for (const widget of promoted[inner.type])
            add("PrimitiveNode", [-400, y += 120]).connect(0, inner, slot(inner, widget));
    const {node, subgraph} = graph.convertToSubgraph(new Set([loader, encode, sampler]));
    subgraph.name = name;
    subgraph.description = description;
    node.title = name;
    const right = Math.max(...subgraph.nodes.map(n => n.pos[0] + n.size[0]));
    subgraph.inputNode.pos = [-subgraph.inputNode.size[0] - 60, 0];
    subgraph.outputNode.pos = [right + 60, 0];
    return JSON.stringify(graph.serialize());
}"""


def blueprint(workflow: dict) -> dict:
    """The subgraph node alone, its links to the authoring graph cut, with the subgraph's definition."""
    definition, = workflow["definitions"]["subgraphs"]
    definition |= {"category": CATEGORY}  # the frontend keeps a subgraph's category but does not save it
    node = next(n for n in workflow["nodes"] if n["type"] == definition["id"])
    node = node | {"id": 1, "pos": [0, 0], "order": 0,
                   "inputs": [i | {"link": None} for i in node["inputs"]],
                   "outputs": [o | {"links": []} for o in node["outputs"]]}
    return {"revision": 0, "last_node_id": 1, "last_link_id": 0, "nodes": [node], "links": [], "version": 0.4,
            "definitions": {"subgraphs": [definition]}, "extra": {}}


def main() -> None:
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI (0.33 or later) whose requirements are installed in this Python")
    sys.path.insert(0, str(TESTS))
    import browser
    from test_browser_workflows import MODEL_FILES, host_problems

    with tempfile.TemporaryDirectory() as base, browser.comfy_server(Path(base), model_files=MODEL_FILES) as url, \
            browser.chromium_page(url, host_problems(url)) as frontend:
        workflow = json.loads(frontend.page.evaluate(AUTHOR, [NAME, DESCRIPTION, PROMOTED]))
        problems = frontend.problems.take()
        if problems:
            sys.exit(f"the frontend reported problems while authoring: {problems}")
    BLUEPRINT.parent.mkdir(exist_ok=True)
    BLUEPRINT.write_text(json.dumps(blueprint(workflow), indent=2) + "\n")
    print(f"wrote {BLUEPRINT} with frontend {frontend.version}")


if __name__ == "__main__":
    main()
