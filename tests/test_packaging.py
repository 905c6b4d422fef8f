"""What ComfyUI Manager and the Registry read: metadata, and requirements that match and never pin torch."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from pathspec import PathSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # the pack supports Python 3.10, where tomllib's predecessor is the tomli package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = ("__init__.py", "nodes/", "xpsr_core/", "web/", "workflows/", "subgraphs/", "configs/", "scripts/",
           "benchmarks/", "README.md", "LICENSE", "pyproject.toml", "requirements.txt")
"""What ComfyUI needs to run the pack, its workflows and its commands: every tracked file here is shipped."""


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


def tracked_files() -> list[str]:
    try:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the Registry package is made from git's file list, and git cannot list {ROOT}: {error}")
    return [line for line in listing.stdout.splitlines() if line.strip()]


def packed_files() -> list[str]:
    """The files `comfy node pack` (comfy-cli's zip_files) puts in the Registry package, by its rules.

    Git's tracked files, minus those matching .comfyignore (gitwildmatch patterns, blank and
    '#' lines skipped) unless they lie under a [tool.comfy] includes path, plus the files
    under those paths.
    """
    ignore_file = ROOT / ".comfyignore"
    lines = ignore_file.read_text().splitlines() if ignore_file.is_file() else []
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    with warnings.catch_warnings():  # comfy-cli still names the patterns 'gitwildmatch', which pathspec deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        spec = PathSpec.from_lines("gitwildmatch", patterns)
    includes = [os.path.normpath(i.lstrip("/")).replace(os.sep, "/") for i in PROJECT["tool"]["comfy"]["includes"]]

    def shipped(path: str) -> bool:
        return any(path == i or path.startswith(i + "/") for i in includes) or not spec.match_file(path)

    extra = [p.relative_to(ROOT).as_posix() for i in includes for p in sorted((ROOT / i).rglob("*")) if p.is_file()]
    return sorted({path for path in tracked_files() + extra if shipped(path)})


def test_registry_package_leaves_out_tests_and_fixtures():
    packed = packed_files()
    assert not [p for p in packed if p.startswith("tests/")], "tests (33 MB of fixtures) would be in the package"
    assert not [p for p in packed if p.startswith(".ci/")]
    size = sum((ROOT / p).stat().st_size for p in packed)
    assert size < 2_500_000, f"the package would hold {size / 1e6:.1f} MB"  # 1.6 MB: the 7 workflows' thumbnails


def test_registry_package_holds_everything_the_pack_runs_with():
    packed = set(packed_files())
    runtime = [p for p in tracked_files() if p in RUNTIME or p.startswith(tuple(d for d in RUNTIME if d.endswith("/")))]
    assert runtime and not set(runtime) - packed, f"left out of the package: {sorted(set(runtime) - packed)}"
    assert {"__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE"} <= packed
    assert any(p.startswith("workflows/") and p.endswith(".jpg") for p in packed), "workflow thumbnails are missing"
    assert "subgraphs/XPSR Upscale.json" in packed, "the subgraph blueprint is missing"


def test_packing_rules_are_comfy_clis(tmp_path: Path, monkeypatch):
    """Where comfy-cli is installed, its own zip_files packs exactly what packed_files() says."""
    file_utils = pytest.importorskip("comfy_cli.file_utils",
                                     reason="comfy-cli is not installed (pip install comfy-cli)")
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        file_utils.zip_files(tmp_path / "node.zip", includes=PROJECT["tool"]["comfy"]["includes"])
    with zipfile.ZipFile(tmp_path / "node.zip") as archive:
        assert sorted(archive.namelist()) == packed_files()
