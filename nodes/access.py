"""What a queued workflow may touch on the server: dataset folders and model code, as the server's owner allows.

On a shared ComfyUI server (``--listen``, a hosted instance, a team box) whoever queues a workflow sets every
widget, so a folder path or trust_remote_code typed into a node is a request, not a permission. ComfyUI's own
file nodes stay inside its input, output and model folders; XPSR's dataset nodes stay inside the input and
output folders and the folders the owner lists in XPSR_DATASET_DIRS, and the Python code shipped in a model
folder runs only where the owner started ComfyUI with XPSR_ALLOW_REMOTE_CODE=1. The command-line tools run
as the local user and take any path.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

DATASET_DIRS_ENV = "XPSR_DATASET_DIRS"
"""Extra folders (os.pathsep-separated) under which the server's owner lets workflows read and write datasets."""

REMOTE_CODE_ENV = "XPSR_ALLOW_REMOTE_CODE"
"""Set to 1 by the server's owner to let trust_remote_code run the Python code shipped in model folders."""


def dataset_roots() -> list[Path]:
    """The folders datasets may live in, resolved: ComfyUI's input and output folders, then the owner's list.

    Read at every call, so the owner's setting is the one ComfyUI was started with and tests can change it.
    """
    listed = [p for p in os.environ.get(DATASET_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    folders = [folder_paths.get_input_directory(), folder_paths.get_output_directory(), *listed]
    return [Path(os.path.realpath(f)) for f in folders]


def allowed_path(path: str | Path, what: str) -> Path:
    """``path`` with symlinks and '..' resolved, refused unless it lies inside a folder datasets may live in.

    ``what`` names the path in the error as the user knows it (e.g. "dataset 'sets/mine'"). A path that does
    not exist yet resolves through its existing parents, so a file about to be written is checked where it
    would really land, dangling symlinks included.
    """
    resolved = Path(os.path.realpath(path))
    roots = dataset_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PermissionError(
            f"{what} resolves to {resolved}, outside the folders datasets may live in on this server: "
            f"{', '.join(map(str, roots))} (ComfyUI's input and output folders, then {DATASET_DIRS_ENV}); put the "
            f"dataset there, or ask the server's owner to list its folder in the environment variable "
            f"{DATASET_DIRS_ENV} (folders separated by {os.pathsep!r}) when starting ComfyUI")
    return resolved


def dataset_folder(dataset: str) -> Path:
    """A dataset input as the folder it names: relative to ComfyUI's input folder, or absolute, and allowed."""
    name = dataset.strip()
    if not name:
        raise ValueError("dataset is empty: expected the folder that holds LR/, relative to ComfyUI's input folder "
                         f"({folder_paths.get_input_directory()}) or an absolute path inside the allowed folders")
    folder = allowed_path(Path(folder_paths.get_input_directory()) / name, f"dataset {dataset!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset {dataset!r} is not a folder ({folder} does not exist): expected the folder "
                                "that holds LR/, relative to ComfyUI's input folder or absolute")
    return folder


def require_remote_code_allowed(model: str) -> None:
    """Refuse trust_remote_code unless the server's owner allowed it; called before any file of the model is read."""
    if os.environ.get(REMOTE_CODE_ENV) != "1":
        raise PermissionError(
            f"trust_remote_code is on for {model!r}, but this ComfyUI server does not allow the Python code shipped "
            f"in model folders to run: its owner can allow it by starting ComfyUI with the environment variable "
            f"{REMOTE_CODE_ENV}=1 (only where every folder under models/LLM is trusted). Models that transformers "
            "knows (LLaVA, LLaVA-NeXT, Qwen2-VL) load with trust_remote_code off")
