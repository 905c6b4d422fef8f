"""A test node pack: the tiny Qwen3-VL CLIP of tests/tiny_comfy_vlm.py as a node, standing in for Load CLIP of a real
Qwen3-VL file (ComfyUI's Load CLIP builds Qwen3-VL at its released sizes). Loaded in-process by comfy_host and into
test servers (browser.comfy_server's packs), so workflows with the CLIP captioning route run with it."""

from __future__ import annotations

import sys
from pathlib import Path

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny_comfy_vlm  # noqa: E402


class XPSRTestTinyQwen3VL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id="XPSRTestTinyQwen3VL", category="testing", inputs=[], outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(tiny_comfy_vlm.shared())


class _Extension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [XPSRTestTinyQwen3VL]


async def comfy_entrypoint() -> ComfyExtension:
    return _Extension()
