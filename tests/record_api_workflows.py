"""Writes workflows/api/<name>.json: each example workflow as the API prompt ComfyUI's own frontend makes of it.

    COMFYUI_PATH=/path/to/ComfyUI python tests/record_api_workflows.py

The frontend loads every workflows/<name>.json and converts it as the Queue button does
(``app.graphToPrompt``); scripts and services queue these files with POST /prompt. Run it after
changing a workflow, and commit the files: the browser test checks that every frontend it runs
converts each workflow to its file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
API = TESTS.parent / "workflows" / "api"
CONVERT = "async () => (await app.graphToPrompt()).output"
"""What the Queue button sends as the prompt."""


def write(prompt: dict, path: Path) -> None:
    path.write_text(json.dumps(prompt, indent=2, sort_keys=True) + "\n")


def main() -> None:
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI whose requirements are installed in this Python")
    sys.path.insert(0, str(TESTS))
    import browser
    from test_browser_workflows import MODEL_FILES, WORKFLOWS, host_problems

    API.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as base, browser.comfy_server(Path(base), model_files=MODEL_FILES) as url, \
            browser.chromium_page(url, host_problems(url)) as frontend:
        for workflow in WORKFLOWS:
            report = browser.load_workflow(frontend, json.loads(workflow.read_text()))
            if any(report.values()):
                sys.exit(f"{workflow.name} did not load cleanly: {report}")
            write(frontend.page.evaluate(CONVERT), API / workflow.name)
            print(f"wrote {API / workflow.name}")
    print(f"with frontend {frontend.version}")


if __name__ == "__main__":
    main()
