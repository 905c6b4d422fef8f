"""What ComfyUI Manager and the Registry read: metadata, and requirements that match and never pin torch."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirements_txt_equals_the_project_dependencies():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert lines == PROJECT["project"]["dependencies"]


def test_torch_and_friends_are_never_dependencies():
    names = {d.split("<")[0].split(">")[0].split("=")[0].strip().lower() for d in PROJECT["project"]["dependencies"]}
    assert not names & {"torch", "torchvision", "torchaudio"}


def test_registry_metadata():
    comfy = PROJECT["tool"]["comfy"]
    assert PROJECT["project"]["name"] == "comfyui-xpsr" and PROJECT["project"]["version"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert comfy["requires-comfyui"].startswith(">=")
    assert (ROOT / "LICENSE").is_file()


def test_comfyui_finds_the_entrypoint():
    source = (ROOT / "__init__.py").read_text()
    assert "async def comfy_entrypoint" in source and "NODE_CLASS_MAPPINGS" not in source
