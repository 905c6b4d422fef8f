"""XPSR Load Captioned Images: caption files in the official layout feed a graph as XPSR Caption's output does.

The captions are read by the official test script's rule (first line, leading spaces removed, "" for an empty
file); the images are what ComfyUI's own Load Image gives for the same files.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch

import comfy_host as H  # skips this module without COMFYUI_PATH


def image_file(path: Path, height: int = 16, width: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    H.pack_module("nodes.caption").to_pil(H.test_image(height, width, seed=seed)[0]).save(path)
    return path


def caption_file(dataset: Path, folder: str, name: str, text: str) -> None:
    (dataset / folder).mkdir(parents=True, exist_ok=True)
    (dataset / folder / f"{name}.txt").write_text(text, encoding="utf-8")


@pytest.fixture
def dataset(request) -> Path:
    """Two 16x16 LR images in ComfyUI's output folder: a's captions with leading spaces, a second line and an
    empty file, b's plain."""
    H.setup_host()
    root = Path(H.folder_paths.get_output_directory()) / f"captioned_{request.node.name}_{uuid.uuid4().hex[:6]}"
    for i, name in enumerate("ab"):
        image_file(root / "LR" / f"{name}.png", seed=i)
    caption_file(root, "highlevel_prompt", "a", "   a red brick wall  \nsecond line, never read\n")
    caption_file(root, "lowlevel_prompt_q", "a", "")
    caption_file(root, "highlevel_prompt", "b", "a dog on grass\n")
    caption_file(root, "lowlevel_prompt_q", "b", " blurry and noisy")
    return root


def loader(dataset: str, start: int = 0, count: int = 0, missing_caption: str = "error",
           captions: str = "whole image") -> dict:
    return {"class_type": "XPSRLoadCaptionedImages", "inputs": {
        "dataset": dataset, "start": start, "count": count, "missing_caption": missing_caption, "captions": captions}}


def loader_prompt(dataset: str, **options) -> dict:
    return {"1": loader(dataset, **options), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def loaded(dataset: str, **options) -> tuple[torch.Tensor, list[str], list[str]]:
    executor, _ = H.run_ok(loader_prompt(dataset, **options))
    image, high, low = H.outputs(executor, "1")
    return image[0], high, low


def load_image_node(path: Path) -> torch.Tensor:
    """ComfyUI's own Load Image on the same file (under ComfyUI's output folder, as the datasets here are)."""
    name = path.relative_to(H.folder_paths.get_output_directory()).as_posix()
    return H.nodes.LoadImage().load_image(f"{name} [output]")[0]


def test_captions_follow_the_official_reading_rule_one_per_image(dataset: Path):
    image, high, low = loaded(str(dataset))
    assert high == ["a red brick wall  ", "a dog on grass"]
    assert low == ["", "blurry and noisy"]
    assert torch.equal(image, torch.cat([load_image_node(dataset / "LR" / f"{n}.png") for n in "ab"]))


def test_start_and_count_choose_the_images_in_name_order(dataset: Path):
    image, high, low = loaded(str(dataset), start=1, count=1)
    assert (high, low) == (["a dog on grass"], ["blurry and noisy"])
    assert torch.equal(image, load_image_node(dataset / "LR" / "b.png"))
    executor, _ = H.run(loader_prompt(str(dataset), start=2))
    assert "has 2 LR images, none from start 2" in H.error_message(executor)


def test_a_missing_caption_file_is_an_error_naming_it_or_an_empty_prompt_by_choice(dataset: Path):
    (dataset / "lowlevel_prompt_q" / "b.txt").unlink()
    executor, _ = H.run(loader_prompt(str(dataset)))
    message = H.error_message(executor)
    assert not executor.success
    assert f"caption file {dataset / 'lowlevel_prompt_q' / 'b.txt'} does not exist" in message
    assert "set missing_caption to empty" in message
    assert loaded(str(dataset), missing_caption="empty")[2] == ["", ""]


def test_images_of_different_sizes_are_refused_as_one_batch_and_load_one_by_one(dataset: Path):
    image_file(dataset / "LR" / "b.png", height=16, width=24)
    executor, _ = H.run(loader_prompt(str(dataset)))
    assert "different sizes (a.png 16x16, b.png 24x16)" in H.error_message(executor)
    assert loaded(str(dataset), start=1, count=1)[0].shape == (1, 16, 24, 3)


def test_a_dataset_outside_the_allowed_folders_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("XPSR_DATASET_DIRS", raising=False)
    image_file(tmp_path / "private" / "LR" / "a.png")
    executor, _ = H.run(loader_prompt(str(tmp_path / "private")))
    assert not executor.success
    assert f"resolves to {tmp_path / 'private'}, outside the folders datasets may live in" in H.error_message(executor)


def test_a_caption_file_linked_from_outside_is_refused(tmp_path: Path, dataset: Path, monkeypatch):
    monkeypatch.delenv("XPSR_DATASET_DIRS", raising=False)
    (tmp_path / "secret.txt").write_text("a file of the server's")
    (dataset / "highlevel_prompt" / "b.txt").unlink()
    (dataset / "highlevel_prompt" / "b.txt").symlink_to(tmp_path / "secret.txt")
    executor, _ = H.run(loader_prompt(str(dataset)))
    assert not executor.success
    assert f"resolves to {tmp_path / 'secret.txt'}, outside the folders datasets may live in" in (
        H.error_message(executor))


def test_edited_caption_files_are_read_again(dataset: Path):
    executor = H.pack_module("nodes.host_compat").prompt_executor(H.DummyServer())
    captions = []
    for text in ("first caption", "edited caption"):
        caption_file(dataset, "highlevel_prompt", "b", text)
        prompt = loader_prompt(str(dataset))  # a queued prompt arrives fresh; ComfyUI notes the fingerprint in it
        valid = asyncio.run(H.execution.validate_prompt("p", prompt, None))
        asyncio.run(executor.execute_async(prompt, str(uuid.uuid4()), extra_data={}, execute_outputs=valid[2]))
        captions.append(H.outputs(executor, "1")[1][1])
    assert captions == ["first caption", "edited caption"]


def conditioning_tensors(conditioning: list) -> list[torch.Tensor]:
    """Every tensor a CONDITIONING carries: the embeddings, the pooled output and the model_conds (c_l)."""
    return [t for cond, extra in conditioning
            for t in (cond, extra["pooled_output"], *(c.cond for c in extra["model_conds"].values()))]


def test_the_caption_files_give_the_conditioning_and_the_image_of_the_same_prompts_typed(dataset: Path):
    from_files = H.graph(scale=2.0) | {"4": loader(str(dataset))}
    from_files["3"]["inputs"] |= {"high_level": ["4", 1], "low_level": ["4", 2]}
    typed = H.graph(scale=2.0) | {
        "4": loader(str(dataset)),
        "11": {"class_type": "XPSRTestLines", "inputs": {"text": "a red brick wall  |a dog on grass"}},
        "12": {"class_type": "XPSRTestLines", "inputs": {"text": "|blurry and noisy"}}}
    typed["3"]["inputs"] |= {"high_level": ["11", 0], "low_level": ["12", 0]}
    results = []
    for prompt in (from_files, typed):
        executor, _ = H.run_ok(prompt)
        results.append(([conditioning_tensors(H.output(executor, "3", i)) for i in (0, 1)], H.output(executor, "5")))
    (conditioning, image), (typed_conditioning, typed_image) = results
    for from_file, typed_in in zip(conditioning, typed_conditioning, strict=True):
        assert len(from_file) == len(typed_in) == 3
        assert all(torch.equal(a, b) for a, b in zip(from_file, typed_in, strict=True))
    assert conditioning[0][0].shape[0] == 2
    assert image.shape == (2, 32, 32, 3) and torch.equal(image, typed_image)


def tile_captions_file(dataset: Path, folder: str, name: str, text: str) -> None:
    (dataset / folder / f"{name}.tiles.txt").write_text(text, encoding="utf-8")


def test_per_tile_caption_files_give_each_tile_its_line_as_the_same_prompts_typed(dataset: Path):
    """<name>.tiles.txt beside the official file: one caption per line and tile, every image's tiles in one list,
    through XPSR Dual Prompt Encode's tile grid into the tiled sampler, as the same captions typed."""
    for name, high, low in (("a", " a wall\na roof\nsky\ntree\n", "blurry\nnoisy\nsharp\ndark\n"),
                            ("b", "a dog\ngrass\nsun\nsand\n", "dark\nsharp\nnoisy\nblurry")):
        tile_captions_file(dataset, "highlevel_prompt", name, high)
        tile_captions_file(dataset, "lowlevel_prompt_q", name, low)
    settings = {"scale": 8.0, "process_size": 64, "tile_size": 8, "tile_overlap": 0}  # a 16 x 16 latent: 2 x 2 tiles
    _, high, low = loaded(str(dataset), captions="per tile")
    assert high == ["a wall", "a roof", "sky", "tree", "a dog", "grass", "sun", "sand"]
    assert low == ["blurry", "noisy", "sharp", "dark", "dark", "sharp", "noisy", "blurry"]

    def per_tile_graph(high_level, low_level) -> dict:
        prompt = H.graph(**settings) | {"4": loader(str(dataset), captions="per tile"),
                                        "9": {"class_type": "XPSRTileGrid", "inputs": settings | {"image": ["4", 0]}}}
        prompt["3"]["inputs"] |= {"high_level": high_level, "low_level": low_level, "tile_grid": ["9", 0]}
        return prompt

    from_files = per_tile_graph(["4", 1], ["4", 2])
    typed = per_tile_graph(["11", 0], ["12", 0]) | {
        "11": {"class_type": "XPSRTestLines", "inputs": {"text": "|".join(high)}},
        "12": {"class_type": "XPSRTestLines", "inputs": {"text": "|".join(low)}}}
    outputs = []
    for prompt in (from_files, typed):
        executor, _ = H.run_ok(prompt)
        assert H.output(executor, "9", 2) == 4
        outputs.append(H.output(executor, "5", 1)["samples"])
    assert torch.equal(*outputs)


def test_per_tile_caption_files_must_exist_and_hold_as_many_captions_for_every_image(dataset: Path):
    executor, _ = H.run(loader_prompt(str(dataset), captions="per tile"))
    assert not executor.success and "per-tile caption file" in H.error_message(executor) and (
        "a.tiles.txt does not exist") in H.error_message(executor)
    for name, text in (("a", "one\ntwo\n"), ("b", "one\ntwo\nthree\n")):
        tile_captions_file(dataset, "highlevel_prompt", name, text)
        tile_captions_file(dataset, "lowlevel_prompt_q", name, text)
    executor, _ = H.run(loader_prompt(str(dataset), captions="per tile"))
    assert "the per-tile caption files hold different numbers of captions (a.tiles.txt 2, b.tiles.txt 3)" in (
        H.error_message(executor))
