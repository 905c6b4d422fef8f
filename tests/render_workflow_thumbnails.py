"""Render the example workflows' thumbnails (workflows/<name>.jpg) from ComfyUI's real frontend.

The thumbnails are what ComfyUI's template browser (and, for xpsr_mllm_captions, the README) shows of each
workflow, so they are drawn by the frontend itself rather than by hand, and re-rendered whenever a workflow's
layout changes:

    COMFYUI_PATH=/path/to/ComfyUI python tests/render_workflow_thumbnails.py [workflows/<name>.json ...]

in an environment with playwright and Pillow and with Debian's Chromium (as for tests/test_browser_workflows.py);
without arguments it renders all of workflows/*.json. It uses the frontend ComfyUI pins (what users get).

Each graph is drawn at ``ZOOM``: text at the size a user sees it at 100 %, well above the zoom under which
LiteGraph stops drawing text (``LiteGraph.Canvas.MinFontSizeForLOD``, 8 px of its 14 px text: about 0.57), to
which fitting the largest workflow into an ordinary 1600x1000 window would bring it. So the window is sized to
each graph at that zoom instead; the canvas info text and canvas menu are hidden, and the picture is cropped to
the nodes. A workflow that does not load cleanly (the browser test's checks) gets no thumbnail.
tests/test_workflow_files.py fails when a thumbnail's size no longer matches its workflow's layout.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from pathlib import Path

import browser
from test_browser_workflows import CLEAN, MODEL_FILES, host_problems

ZOOM = 1.0
# Around the graph, in CSS pixels: the canvas shown beyond it in the window (left, top, right, bottom) and the
# part of that kept in the crop; the top one has room for the node badges LiteGraph draws above a title bar.
CANVAS_MARGINS = (60, 80, 60, 60)
CROP_MARGINS = (24, 44, 24, 24)
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
JPEG_QUALITY = 80  # text stays crisp; the largest thumbnail stays under 300 kB
# Overlays that are no part of the graph: the stats text in the canvas's corner and the zoom controls.
HIDDEN = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False}
CANVAS_BOX = "() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.x, r.y, r.right, r.bottom]; }"
# Places the graph's top left corner at the canvas margins at ZOOM and tells the canvas its zoom changed (setting
# ds.scale alone leaves LiteGraph's low-quality flag as it was); returns whether LiteGraph now draws without text.
SHOW_GRAPH = """([zoom, left, top, title]) => {
    const c = app.canvas;
    const x0 = Math.min(...app.graph.nodes.map(n => n.pos[0]));
    const y0 = Math.min(...app.graph.nodes.map(n => n.pos[1] - title));
    c.ds.scale = zoom;
    c.ds.offset = [left / zoom - x0, top / zoom - y0];
    c.ds.onChanged?.(c.ds.scale, c.ds.offset);
    c.deselectAll?.();
    c.setDirty(true, true);
    return c.low_quality;
}"""
# Load Image shows its picture once it has been fetched.
IMAGES_LOADED = """() => app.graph.nodes.filter(n => n.type === 'LoadImage')
    .every(n => n.imgs?.length && n.imgs.every(i => i.complete && i.naturalWidth > 0))"""
NEXT_FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def graph_size(workflow: dict) -> tuple[float, float]:
    """Width and height of a workflow's nodes on the canvas, title bars included, at zoom 1."""
    nodes = workflow["nodes"]
    width = max(n["pos"][0] + n["size"][0] for n in nodes) - min(n["pos"][0] for n in nodes)
    height = max(n["pos"][1] + n["size"][1] for n in nodes) - min(n["pos"][1] - TITLE_HEIGHT for n in nodes)
    return width, height


def thumbnail_size(workflow: dict) -> tuple[int, int]:
    """The pixel size of a workflow's thumbnail: its graph at ``ZOOM`` and the crop's margins. A thumbnail of
    another size was rendered from another layout."""
    crop_left, crop_top, crop_right, crop_bottom = CROP_MARGINS
    width, height = (math.ceil(d * ZOOM) for d in graph_size(workflow))
    return crop_left + width + crop_right, crop_top + height + crop_bottom


def render(frontend: browser.FrontendPage, workflow: dict, target: Path) -> dict:
    """Load ``workflow``, draw it at ``ZOOM`` in a window that shows it whole and save the crop around its nodes
    as JPEG at ``target``; return what was drawn (zoom, pixel size, bytes). Raises if the workflow does not load
    cleanly or if LiteGraph would draw it without text."""
    from PIL import Image

    page = frontend.page
    left, top, right, bottom = CANVAS_MARGINS
    width, height = (math.ceil(d * ZOOM) for d in graph_size(workflow))
    canvas_x, canvas_y, _, _ = page.evaluate(CANVAS_BOX)  # where the sidebar and menu bar leave the canvas
    page.set_viewport_size({"width": math.ceil(canvas_x) + left + width + right,
                            "height": math.ceil(canvas_y) + top + height + bottom})
    report = browser.load_workflow(frontend, workflow)
    if report != CLEAN:
        raise RuntimeError(f"{target.stem} does not load cleanly: {report}")
    page.wait_for_function(IMAGES_LOADED, timeout=30_000)
    canvas = page.evaluate(CANVAS_BOX)
    if page.evaluate(SHOW_GRAPH, [ZOOM, left, top, TITLE_HEIGHT]):
        raise RuntimeError(f"{target.stem}: LiteGraph draws zoom {ZOOM} in low quality, without text")
    page.evaluate(NEXT_FRAMES)
    page.wait_for_timeout(500)  # the DOM widgets (prompt boxes, notes) follow the canvas on its next frames
    crop_left, crop_top, crop_right, crop_bottom = CROP_MARGINS
    x0, y0 = canvas[0] + left - crop_left, canvas[1] + top - crop_top
    x1, y1 = canvas[0] + left + width + crop_right, canvas[1] + top + height + crop_bottom
    if x0 < canvas[0] or y0 < canvas[1] or x1 > canvas[2] or y1 > canvas[3]:
        raise RuntimeError(f"{target.stem}: the crop {[x0, y0, x1, y1]} leaves the canvas {canvas}")
    shot = page.screenshot(clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}, type="png")
    picture = Image.open(io.BytesIO(shot)).convert("RGB")
    if picture.size != thumbnail_size(workflow):
        raise RuntimeError(f"{target.stem}: rendered {picture.size}, expected {thumbnail_size(workflow)}")
    picture.save(target, "JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
    return {"zoom": ZOOM, "size": picture.size, "bytes": target.stat().st_size}


def main(paths: list[Path]) -> None:
    """Render the thumbnail of each workflow in ``paths`` next to it."""
    reason = browser.unavailable()
    if reason:
        sys.exit(f"cannot render thumbnails: {reason}")
    workflows = [json.loads(p.read_text()) for p in paths]
    with tempfile.TemporaryDirectory(prefix="comfy_base_") as base, \
            browser.comfy_server(Path(base), model_files=MODEL_FILES, settings=HIDDEN) as url, \
            browser.chromium_page(url, host_problems(url)) as frontend:
        for path, workflow in zip(paths, workflows, strict=True):
            result = render(frontend, workflow, path.with_suffix(".jpg"))
            print(f"{path.with_suffix('.jpg')}: zoom {result['zoom']}, "
                  f"{result['size'][0]}x{result['size'][1]} px, {result['bytes'] / 1000:.0f} kB")


if __name__ == "__main__":
    main([Path(a).resolve() for a in sys.argv[1:]] or sorted((browser.REPO / "workflows").glob("*.json")))
