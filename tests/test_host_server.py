"""A user's session through ComfyUI's own server, over HTTP and the websocket only: model files on disk loaded by
the stock loaders, an LR image uploaded, the shipped API workflows queued, their messages followed, results
fetched with /view, interrupts, a queue of prompts, /free, and the README's client.

The server is ComfyUI's main.py on loopback (--cpu) with the pack in custom_nodes and the model files a user has
(tests/user_models.py) in its models folder; its results are held to what ComfyUI's executor gives in this process
for the same prompt and seed.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.sd
import comfy.supported_models

import browser
import user_models as U
from comfy_client import ComfyClient, Run

LR_SIDE = U.LR_SIDE
SAVE = "8"
"""The Save Image node of the manual-prompts workflow."""
CAPTION = "5"
SAMPLER = "7"

@pytest.fixture(scope="session")
def user_models(tmp_path_factory) -> U.UserModels:
    return U.write_user_models(tmp_path_factory.mktemp("comfy_user") / "models")


@pytest.fixture(scope="module")
def server(user_models: U.UserModels):
    with browser.comfy_server(user_models.models.parent, packs=[H.REPO / "tests" / "server_probe"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> ComfyClient:
    return ComfyClient(server)


@pytest.fixture(scope="module")
def lr_image(tmp_path_factory) -> Path:
    return U.write_lr_photo(tmp_path_factory.mktemp("lr") / "xpsr_server_lr.png")


@pytest.fixture(scope="module")
def uploaded(client: ComfyClient, lr_image: Path) -> str:
    return client.upload_image(lr_image)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def in_process_image(prompt: dict, user_models: U.UserModels, lr_image: Path, name: str) -> np.ndarray:
    """The prompt run by ComfyUI's executor in this process, on the same files, as Save Image wrote it."""
    H.setup_host()
    for folder in ("checkpoints", "xpsr", "LLM"):
        H.folder_paths.add_model_folder_path(folder, str(user_models.models / folder))
    shutil.copy(lr_image, Path(H.folder_paths.get_input_directory()) / name)
    executor, _ = H.run_ok(prompt)
    image = executor.history_result["outputs"][SAVE]["images"][0]
    return np.asarray(Image.open(Path(H.folder_paths.get_output_directory()) / image["subfolder"] / image["filename"]))


def test_load_checkpoint_detects_the_users_checkpoint_as_sd15(user_models: U.UserModels):
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(user_models.models / "checkpoints" / U.CHECKPOINT))
    assert type(model.model.model_config) is comfy.supported_models.SD15


@pytest.fixture(scope="module")
def first_run(client: ComfyClient, uploaded: str, user_models: U.UserModels) -> tuple[Run, np.ndarray]:
    prompt = U.api_workflow("xpsr_manual_prompts", uploaded, user_models, seed=5)
    run, = client.run(prompt)
    return run, pixels(client.images(run.prompt_id, SAVE)[0])


def test_a_queued_prompt_reports_its_progress_and_gives_the_in_process_image(
        first_run, user_models: U.UserModels, lr_image: Path, uploaded: str):
    run, image = first_run
    kinds = run.kinds()
    assert kinds[0] == "execution_start" and run.end == "execution_success" == kinds[-2], kinds
    progress = [data for kind, data in run.messages if kind == "progress"]
    assert progress and {p["node"] for p in progress} == {SAMPLER} and progress[-1]["value"] == progress[-1]["max"]
    executing = [data["node"] for kind, data in run.messages if kind == "executing"]
    assert {SAMPLER, SAVE} <= set(executing)
    executed = next(data for kind, data in run.messages if kind == "executed" and data["node"] == SAVE)
    assert executed["output"]["images"][0]["type"] == "output"
    assert image.shape == (LR_SIDE * 2, LR_SIDE * 2, 3)
    reference = in_process_image(U.api_workflow("xpsr_manual_prompts", uploaded, user_models, seed=5), user_models,
                                 lr_image, uploaded)
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 1


def interrupt_at(client: ComfyClient, node: str, kind: str) -> callable:
    """An on_message hook that interrupts the run once ``node`` sends a ``kind`` message; it notes when."""
    def hook(run: Run, message_kind: str, data) -> None:
        if message_kind == kind and isinstance(data, dict) and data.get("node") == node and not hasattr(hook, "at"):
            hook.at = time.monotonic()
            client.interrupt()
    return hook


@pytest.mark.parametrize(("graph", "node", "kind", "settings"), [
    ("xpsr_manual_prompts", SAMPLER, "progress", {"steps": 400}),
    ("xpsr_mllm_captions", CAPTION, "executing", {}),
], ids=["xpsr_sampler", "xpsr_caption"])
def test_interrupt_ends_the_running_prompt_and_the_next_one_is_right(
        client: ComfyClient, uploaded: str, user_models: U.UserModels, first_run, graph: str, node: str, kind: str,
        settings: dict):
    prompt = U.api_workflow(graph, uploaded, user_models, seed=6, **settings)
    if graph == "xpsr_mllm_captions":
        prompt[CAPTION]["inputs"]["max_new_tokens"] = 2048
    hook = interrupt_at(client, node, kind)
    run, = client.run(prompt, on_message=hook)
    assert run.end == "execution_interrupted", run.kinds()
    assert time.monotonic() - hook.at < 5, "the prompt went on for more than 5 s after the interrupt"
    again, = client.run(U.api_workflow("xpsr_manual_prompts", uploaded, user_models, seed=5))
    assert again.end == "execution_success"
    assert np.array_equal(pixels(client.images(again.prompt_id, SAVE)[0]), first_run[1])


def test_three_prompts_queued_at_once_run_in_order(client: ComfyClient, uploaded: str, user_models: U.UserModels):
    runs = client.run(*(U.api_workflow("xpsr_manual_prompts", uploaded, user_models, seed=seed)
                        for seed in (11, 12, 13)))
    assert [run.end for run in runs] == ["execution_success"] * 3
    started = [client.history(run.prompt_id)["status"]["messages"][0] for run in runs]
    assert [message[0] for message in started] == ["execution_start"] * 3
    assert sorted(started, key=lambda message: message[1]["timestamp"]) == started
    images = [pixels(client.images(run.prompt_id, SAVE)[0]) for run in runs]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def loaded_models(client: ComfyClient) -> list[str]:
    return client.probe()["loaded"]


def test_free_with_unload_models_frees_xpsrs_parts(client: ComfyClient, first_run):
    """Where ComfyUI keeps a prompt's models loaded after it (0.33), they include XPSR's parts until /free; 0.3.64
    drops the sampling clones of a prompt's models from its list when the prompt ends, so its list is empty."""
    xpsr_parts = {"SFAControlNet", "ConditionalAttention"}
    before = set(loaded_models(client))
    assert xpsr_parts <= before or not before, before
    client.free(unload_models=True)
    deadline = time.monotonic() + 10
    while xpsr_parts & set(loaded_models(client)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not xpsr_parts & set(loaded_models(client))


def readme_client() -> str:
    """The Python client the README shows for scripts and services."""
    readme = (H.REPO / "README.md").read_text()
    return readme.split("## From scripts and services", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_client_queues_an_api_workflow_and_saves_the_result(
        client: ComfyClient, uploaded: str, user_models: U.UserModels, first_run, tmp_path: Path):
    """Run as shown, its settings line pointed at this server, the first run's prompt and a file of its own."""
    workflow_file = tmp_path / "workflow.json"
    workflow_file.write_text(json.dumps(U.api_workflow("xpsr_manual_prompts", "unset.png", user_models, seed=5)))
    code = readme_client()
    settings = next(line for line in code.splitlines() if line.startswith("SERVER, WORKFLOW, IMAGE, OUT = "))
    code = code.replace(settings, f"SERVER, WORKFLOW, IMAGE, OUT = {client.url!r}, {str(workflow_file)!r}, "
                                  f"{uploaded!r}, {str(tmp_path / 'restored.png')!r}")
    assert len(code.strip().splitlines()) <= 12
    exec(compile(code, "README client", "exec"), {})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "restored.png")), first_run[1])

