"""ComfyUI's real server and frontend in headless Chromium, on loopback, with the pack installed.

The server runs from COMFYUI_PATH with a temporary base directory whose custom_nodes holds
a link to this repository; Chromium (Debian's package) is driven over CDP by Playwright,
never downloading a browser. Used by the browser test, to author the example workflows and to render their
thumbnails (render_workflow_thumbnails.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No first-run dialogs; no minimap over the screenshots; workflows checked against the frontend's schema, as
# frontend 1.27 does by default (later frontends only where this setting is on).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Minimap.Visible": False, "Comfy.Validation.Workflows": True}
SPY = """app.registerExtension({name: 'xpsr.test.missingSpy', async afterConfigureGraph(missing) {
    window.__missing = JSON.parse(JSON.stringify(missing || [])); }});"""
# Records every toast as it appears: PrimeVue's (frontend 1.27) and reka-ui's (newer frontends).
TOAST = ".p-toast-message, [data-testid='toast']"
TOAST_SPY = """window.__toasts = [];
new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes) {
    if (!(n instanceof Element)) continue;
    for (const t of [n, ...n.querySelectorAll(%(toast)r)])
        if (t.matches(%(toast)r)) window.__toasts.push(t);  // read when taken: the content may come later
} }).observe(document, {childList: true, subtree: true});""" % {"toast": TOAST}  # noqa: UP031 (JS braces stay literal)
# Newer frontends list a graph's errors (missing models, invalid values...) in an overlay instead of toasts.
ERROR_OVERLAY = "[data-testid='error-overlay']"
# Nodes saved smaller than the frontend's own minimum size for them (LGraphNode.computeSize).
CRAMPED = """() => app.graph.nodes.filter(n => n.size[0] < n.computeSize()[0] || n.size[1] < n.computeSize()[1])
    .map(n => `${n.type}: ${n.size.map(Math.round)} < ${n.computeSize().map(Math.round)}`)"""
# Widgets whose label and value do not both fit, by the rule LiteGraph's BaseWidget.drawTruncatingText applies
# before it shortens them (default paddings, the widget's own margin and gap, the canvas's widget font).
TRUNCATED = """() => {
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = app.canvas.inner_text_font;
    return app.graph.nodes.flatMap(n => (n.widgets || []).filter(w => ['combo', 'number', 'text'].includes(w.type))
        .map(w => {
            const {margin, labelValueGap} = w.constructor;
            if (typeof margin !== 'number') return `${n.type}.${w.name}: not a LiteGraph widget, cannot measure`;
            const available = (w.width || n.size[0]) - (margin * 2 + 5) - 2 * margin - 20;
            const needed = ctx.measureText(w.displayName).width + labelValueGap +
                ctx.measureText(w._displayValue).width;
            return needed > available ? `${n.type}.${w.name}: needs ${Math.ceil(needed)} px, has ${available}` : null;
        }).filter(Boolean));
}"""
FIT_VIEW = """() => {
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    // margins clear of the panels newer frontends float over the canvas (sidebar, tabs, run button)
    const [left, top, right, bottom] = [80, 110, 40, 40];
    const c = app.canvas, width = c.canvas.width / devicePixelRatio, height = c.canvas.height / devicePixelRatio;
    const scale = Math.min((width - left - right) / (x1 - x0), (height - top - bottom) / (y1 - y0), 1.2);
    c.ds.scale = scale;
    c.ds.offset = [left / scale - x0, top / scale - y0];
    c.setDirty(true, true);
}"""


def frontend_version(front_end_root: Path | None = None) -> str:
    """The version of the frontend a server serves: the comfyui-frontend-package installed beside ComfyUI, or the
    unzipped package whose ``static`` build ``front_end_root`` is."""
    if front_end_root is None:
        return importlib.metadata.version("comfyui-frontend-package")
    package = Path(front_end_root).parent
    info = next(package.parent.glob(f"{package.name}-*.dist-info"), None)
    if info is None:
        raise FileNotFoundError(f"no {package.name}-*.dist-info beside {package}: expected the unzipped "
                                "comfyui-frontend-package wheel")
    return importlib.metadata.PathDistribution(info).version


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
def comfy_server(base: Path, front_end_root: Path | None = None, model_files: Iterable[str] = (),
                 settings: dict | None = None, packs: Iterable[Path] = (), options: Iterable[str] = ()
                 ) -> Iterator[str]:
    """ComfyUI's server with the pack (and ``packs``, other node pack folders) in ``base``/custom_nodes; yields its
    URL. ``options`` are more of main.py's command-line options.

    ``front_end_root`` serves another frontend build (ComfyUI's ``--front-end-root``) instead of the pinned one.
    ``model_files`` (paths under ``models/``) are created empty: they stand for the files a user has downloaded,
    which the frontend lists (and newer frontends flag as missing when absent); nothing reads them.
    ``settings`` are user settings stored on top of ``SETTINGS`` before the frontend first reads them.
    """
    if front_end_root is not None and not (Path(front_end_root) / "index.html").is_file():
        raise FileNotFoundError(f"{front_end_root} is not a ComfyUI frontend build: it has no index.html")
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, folder in (("comfyui-xpsr", REPO), *((Path(pack).name, Path(pack)) for pack in packs)):
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS | (settings or {})))
    for name in model_files:
        (base / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / name).touch()
    shipped = Path(os.environ["COMFYUI_PATH"]) / "input" / "example.png"
    if shipped.is_file():  # a fresh install has it, and the workflows' Load Image shows it
        (base / "input").mkdir(exist_ok=True)
        shutil.copy(shipped, base / "input" / "example.png")
    port = _free_port()
    log = open(base / "server.log", "w")
    frontend = ["--front-end-root", str(front_end_root)] if front_end_root is not None else []
    server = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--base-directory", str(base), *frontend, *options], cwd=os.environ["COMFYUI_PATH"], stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/system_stats", 120)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


@dataclass(frozen=True)
class Ignored:
    """Problems the host causes, not the pack: each named exactly, so that anything else fails the check.

    ``requests``: URL prefixes (a path with its query on the server, the whole URL elsewhere) whose failures and
    "Failed to load resource" console errors are expected; ``console_errors``: first lines of expected console
    errors; ``page_errors``: exact messages of expected uncaught errors.
    """

    requests: tuple[str, ...] = ()
    console_errors: tuple[str, ...] = ()
    page_errors: tuple[str, ...] = ()

    def __add__(self, other: Ignored) -> Ignored:
        return Ignored(self.requests + other.requests, self.console_errors + other.console_errors,
                       self.page_errors + other.page_errors)

    def request(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname in ("127.0.0.1", "localhost"):
            target = parts.path + (f"?{parts.query}" if parts.query else "")
        else:
            target = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return target.startswith(self.requests)


class Problems:
    """Everything the page reported that a user would see as an error: native dialogs (alert, confirm, prompt),
    console errors, uncaught page errors, failed requests and HTTP errors, less the ``Ignored`` ones."""

    def __init__(self, page, ignored: Ignored) -> None:
        self.ignored = ignored
        self.seen: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", self._console)
        page.on("pageerror", self._page_error)
        page.on("response", self._response)
        page.on("requestfailed", self._request_failed)

    def take(self) -> list[str]:
        """The problems seen since the last call."""
        seen, self.seen = self.seen, []
        return seen

    def _dialog(self, dialog) -> None:
        self.seen.append(f"native {dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _console(self, message) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        first_line = message.text.split("\n", 1)[0]
        if first_line.startswith("Failed to load resource") and self.ignored.request(url):
            return
        if first_line not in self.ignored.console_errors:
            self.seen.append(f"console error: {message.text} ({url})")

    def _page_error(self, error) -> None:
        if error.message not in self.ignored.page_errors:
            self.seen.append(f"page error: {error.message}")

    def _response(self, response) -> None:
        if response.status >= 400 and not self.ignored.request(response.url):
            self.seen.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def _request_failed(self, request) -> None:
        if not self.ignored.request(request.url):
            self.seen.append(f"request failed: {request.method} {request.url} ({request.failure})")


@dataclass
class FrontendPage:
    """A ready page on ComfyUI's frontend and the problems it reports."""

    page: object
    problems: Problems
    version: str
    startup: dict


@contextmanager
def chromium_page(url: str, ignored: Ignored = Ignored()) -> Iterator[FrontendPage]:
    """A Playwright page on ComfyUI's frontend, ready (app set up, graph canvas painted), watched for problems
    from before the first request."""
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
            problems = Problems(page, ignored)
            page.add_init_script(TOAST_SPY)
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                   "document.querySelector('#graph-canvas')", timeout=120_000)
            page.evaluate(SPY)
            page.wait_for_timeout(1000)  # the startup requests (settings, templates, update check) end
            startup = {"toasts": take_toasts(page), "problems": problems.take()}
            yield FrontendPage(page, problems, page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__"), startup)
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


def _settle(page) -> None:
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    while page.query_selector(".p-dialog"):
        page.keyboard.press("Escape")
        page.wait_for_timeout(100)


def take_toasts(page) -> list[str]:
    """The text of every toast shown since the last call; the toasts still open are closed."""
    return page.evaluate("""() => {
        const toasts = window.__toasts.splice(0).map(t => t.textContent.trim()).filter(Boolean);
        const store = app.extensionManager.toast;
        (store.dismissAll ?? store.removeAll).call(store);
        return toasts;
    }""")


def load_workflow(frontend: FrontendPage, workflow: dict) -> dict:
    """Load a UI-format workflow; report what a user would see go wrong: missing node types and broken nodes as
    the frontend sees them, dialogs, error overlays, toasts, the page's problems (``Problems``), nodes smaller than
    the frontend's minimum (``CRAMPED``) and widgets whose label or value is cut short (``TRUNCATED``)."""
    page = frontend.page
    take_toasts(page)
    frontend.problems.take()
    page.evaluate("() => { window.__missing = null; }")
    page.evaluate("(wf) => window.app.loadGraphData(wf, true, true, null, {showMissingModelsDialog: false})", workflow)
    page.wait_for_function("() => window.__missing !== null", timeout=30_000)
    page.wait_for_timeout(500)
    report = page.evaluate("""() => ({
        missing: window.__missing,
        unregistered: app.graph.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types)),
        broken: app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
        dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.trim().split('\\n')[0]),
        errors: [...document.querySelectorAll(%r)].filter(e => e.offsetHeight > 0).map(e => e.innerText.trim()),
    })""" % ERROR_OVERLAY)  # noqa: UP031 (JS braces stay literal)
    report["cramped"] = page.evaluate(CRAMPED)
    report["truncated"] = page.evaluate(TRUNCATED)
    report["toasts"] = take_toasts(page)
    report["problems"] = frontend.problems.take()
    _settle(page)
    return report


def screenshot(page, path: Path) -> None:
    """The whole graph, fitted into the canvas."""
    page.evaluate(FIT_VIEW)
    _settle(page)
    page.locator("#graph-canvas").screenshot(path=str(path))


def prompt_labels(page) -> dict[str, str | None]:
    """The label shown on each prompt box of the graph's first XPSR Dual Prompt Encode that the frontend shows,
    by input name (None where a shown box has no visible label)."""
    return page.evaluate("""() => {
        const node = app.graph.nodes.find(n => n.type === 'XPSRDualPromptEncode');
        return Object.fromEntries(node.widgets.filter(w => w.element instanceof HTMLTextAreaElement &&
                                                          w.element.offsetHeight > 0).map(w => {
            const label = w.element.parentElement?.querySelector(':scope > .xpsr-prompt-label');
            return [w.name, label && label.offsetHeight > 0 ? label.textContent : null];
        }));
    }""")


def place_from_node_library(frontend: FrontendPage, name: str) -> dict:
    """Search the node library for ``name`` and drag the entry onto the canvas, as a user adds a node; report
    the nodes then on the canvas (type, title, whether a subgraph, widget names) and what went wrong."""
    page = frontend.page
    take_toasts(page)
    frontend.problems.take()
    library = "Workspace.ToggleSidebarTab.node-library"
    page.evaluate("(command) => app.extensionManager.command.execute(command)", library)
    page.get_by_placeholder("Search", exact=False).first.fill(name)
    entry = page.get_by_text(name, exact=True).first
    entry.drag_to(page.locator("#graph-canvas"), target_position={"x": 900, "y": 400})
    page.wait_for_timeout(500)
    page.evaluate("(command) => app.extensionManager.command.execute(command)", library)
    _settle(page)
    return {"nodes": page.evaluate("""() => app.graph.nodes.map(n => ({type: n.type, title: n.title,
        subgraph: Boolean(n.subgraph), widgets: (n.widgets || []).map(w => w.name)}))"""),
            "toasts": take_toasts(page), "problems": frontend.problems.take()}

