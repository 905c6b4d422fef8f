"""The Registry metadata states the ComfyUI releases the pack supports, and CI holds it to that: every host CI tests
(the oldest supported release and today's) satisfies pyproject.toml's requires-comfyui."""

from __future__ import annotations

import sys

from packaging.specifiers import SpecifierSet

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfyui_version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_this_host_is_within_the_supported_comfyui_range():
    project = tomllib.loads((H.REPO / "pyproject.toml").read_text())
    supported = SpecifierSet(project["tool"]["comfy"]["requires-comfyui"])
    assert comfyui_version.__version__ in supported, (comfyui_version.__version__, str(supported))
