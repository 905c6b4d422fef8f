"""ComfyUI's real server and frontend in headless Chromium, on loopback, with the pack installed.

The server runs from COMFYUI_PATH with a temporary base directory whose custom_nodes holds
a link to this repository; Chromium (Debian's package) is driven over CDP by Playwright,
never downloading a browser. Used by the browser test and to author the example workflows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}
SPY = """app.registerExtension({name: 'xpsr.test.missingSpy', async afterConfigureGraph(missing) {
    window.__missing = JSON.parse(JSON.stringify(missing || [])); }});"""
FIT_VIEW = """() => {
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const c = app.canvas;
    const scale = Math.min(c.canvas.width / (x1 - x0 + 80), c.canvas.height / (y1 - y0 + 80), 1.2);
    c.ds.scale = scale;
    c.ds.offset = [40 / scale - x0, 40 / scale - y0];
    c.setDirty(true, true);
}"""


def unavailable() -> str | None:
    """Why the browser check cannot run here, or None."""
    if not os.environ.get("COMFYUI_PATH"):
        return "COMFYUI_PATH is not set"
    if not Path(CHROMIUM).exists():
        return "Chromium is not installed (Debian: apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


@contextmanager
def comfy_server(base: Path) -> Iterator[str]:
    """ComfyUI's server with the pack in ``base``/custom_nodes; yields its URL."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "comfyui-xpsr"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    port = _free_port()
    log = open(base / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base)], cwd=os.environ["COMFYUI_PATH"], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/system_stats", 120)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


@contextmanager
def chromium_page(url: str) -> Iterator:
    """A Playwright page on ComfyUI's frontend, ready (app set up, graph canvas painted)."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    profile = tempfile.mkdtemp(prefix="chromium_")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
         "--window-size=1600,1000", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/json/version", 30)
        with sync_playwright() as p:
            page = p.chromium.connect_over_cdp(f"http://127.0.0.1:{port}").contexts[0].pages[0]
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                   "document.querySelector('#graph-canvas')", timeout=120_000)
            page.evaluate(SPY)
            yield page
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


def _settle(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    while page.query_selector(".p-dialog"):
        page.keyboard.press("Escape")
        page.wait_for_timeout(100)


def load_workflow(page, workflow: dict) -> dict:
    """Load a UI-format workflow; report missing node types and broken nodes as the frontend sees them."""
    page.evaluate("() => { window.__missing = null; }")
    page.evaluate("(wf) => window.app.loadGraphData(wf, true, true, null, {showMissingModelsDialog: false})", workflow)
    page.wait_for_function("() => window.__missing !== null", timeout=30_000)
    page.wait_for_timeout(500)
    report = page.evaluate("""() => ({
        missing: window.__missing,
        unregistered: app.graph.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types)),
        broken: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
        dialog: !!document.querySelector('.comfy-missing-nodes'),
    })""")
    _settle(page)
    return report


def load_api_prompt(page, prompt: dict) -> dict:
    """Build a graph from an API-format prompt as the frontend does when a prompt is dropped in; return its UI JSON."""
    page.evaluate("(p) => window.app.loadApiJson(p, 'workflow.json')", prompt)
    _settle(page)
    return page.evaluate("() => window.app.graph.serialize()")


def screenshot(page, path: Path) -> None:
    """The whole graph, fitted into the canvas."""
    page.evaluate(FIT_VIEW)
    _settle(page)
    page.locator("#graph-canvas").screenshot(path=str(path))
