"""A client of ComfyUI's server over HTTP and its websocket only, as scripts and services drive it.

It uploads images (``/upload/image``), queues API prompts (``/prompt``) under its own client id,
follows the websocket's messages for them, and fetches results (``/history``, ``/view``),
interrupts (``/interrupt``) and frees memory (``/free``). aiohttp is ComfyUI's own requirement.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ENDS = ("execution_success", "execution_error", "execution_interrupted")
"""The messages that end a prompt's run."""


@dataclass
class Run:
    """What the websocket said about one prompt, in order: (type, data), previews as ("preview", bytes)."""

    prompt_id: str
    messages: list[tuple[str, object]] = field(default_factory=list)

    @property
    def end(self) -> str:
        return next((kind for kind, _ in reversed(self.messages) if kind in ENDS), "")

    @property
    def recorded(self) -> bool:
        """Whether the server is done with the prompt: it says ``executing`` of no node once the prompt's history
        is written, after the message that ends the run."""
        return bool(self.end) and self.messages[-1] == ("executing", {"node": None, "prompt_id": self.prompt_id})

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.messages]


class ComfyClient:
    def __init__(self, url: str):
        self.url = url
        self.client_id = uuid.uuid4().hex

    def post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{route}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                text = answer.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {route}: {e.code} {e.read().decode()[:2000]}") from e
        return json.loads(text) if text else {}

    def get(self, route: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{route}", timeout=60) as answer:
            return answer.read()

    def upload_image(self, path: Path) -> str:
        """The image in the server's input folder; returns the name Load Image takes."""
        async def upload() -> dict:
            form = aiohttp.FormData()
            form.add_field("image", path.read_bytes(), filename=path.name, content_type="image/png")
            form.add_field("overwrite", "true")
            async with aiohttp.ClientSession() as session, session.post(f"{self.url}/upload/image",
                                                                        data=form) as answer:
                answer.raise_for_status()
                return await answer.json()
        return asyncio.run(upload())["name"]

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def run(self, *prompts: dict, on_message: Callable[[Run, str, object], None] | None = None,
            timeout: float = 300) -> list[Run]:
        """Queue ``prompts`` at once and follow the websocket until the server is done with each (its history
        written); ``on_message`` is called with every message of each run as it comes (to interrupt, say)."""
        return asyncio.run(asyncio.wait_for(self._run(prompts, on_message), timeout))

    async def _run(self, prompts: tuple[dict, ...], on_message) -> list[Run]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}", max_msg_size=0) as socket:
            runs = {}
            for prompt in prompts:
                prompt_id = self.queue(prompt)
                runs[prompt_id] = Run(prompt_id)
            current = None
            while not all(run.recorded for run in runs.values()):
                message = await socket.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    kind, data = "preview", message.data
                elif message.type == aiohttp.WSMsgType.TEXT:
                    kind, data = json.loads(message.data)["type"], json.loads(message.data)["data"]
                    current = data.get("prompt_id", current) if isinstance(data, dict) else current
                else:
                    raise ConnectionError(f"the websocket ended: {message.type}")
                run = runs.get(current)
                if run is not None and kind != "status":
                    run.messages.append((kind, data))
                    if on_message is not None:
                        on_message(run, kind, data)
            return list(runs.values())

    def history(self, prompt_id: str) -> dict:
        return json.loads(self.get(f"/history/{prompt_id}"))[prompt_id]

    def images(self, prompt_id: str, node_id: str) -> list[bytes]:
        """The files a node of the prompt saved, fetched with ``/view``."""
        return [self.get("/view?" + urllib.parse.urlencode({"filename": image["filename"], "subfolder":
                                                             image["subfolder"], "type": image["type"]}))
                for image in self.history(prompt_id)["outputs"][node_id]["images"]]

    def probe(self, prompt: dict | None = None) -> dict:
        """What the server's process holds (tests/server_probe's report), read after ``prompt`` ran: queued as
        ``prompt`` plus the probe node, only the probe runs and ComfyUI's caches stay as ``prompt`` left them."""
        probe_id = str(1 + max((int(key) for key in prompt or {} if key.isdigit()), default=0))
        run, = self.run({**(prompt or {}), probe_id: {"class_type": "XPSRTestServerProbe", "inputs": {}}})
        if run.end != "execution_success":
            raise RuntimeError(f"the server probe did not run: {run.kinds()}")
        report = self.history(run.prompt_id)["outputs"][probe_id]
        return {key: value if key == "loaded" else value[0] for key, value in report.items()}

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self, unload_models: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models})
