"""XPSR Caption through a ComfyUI CLIP whose model generates text from images: each caption is what ComfyUI's own
Generate Text node writes with sampling off, the model is ComfyUI's to place, interrupts stop it, and a CLIP or a host
that cannot caption is refused saying why.

The model is a tiny random-weight Qwen3-VL built by ComfyUI's own loader (tiny_comfy_vlm). Tests that need it run only
where ComfyUI has CLIP text generation and Qwen3-VL (after 0.3.64); the refusals run on every host.
"""

from __future__ import annotations

import pytest

import comfy_host as H  # skips this module without COMFYUI_PATH

import comfy.model_management as mm
import comfy.sd
import comfy.utils

import tiny_comfy_vlm
from xpsr_core.captioning.mllm import clean_caption

pytestmark = pytest.mark.usefixtures("one_thread")

HIGH = "Describe the content."
LOW = "Describe the quality."
NODE = "XPSRTestTinyQwen3VL"


@pytest.fixture(scope="module", autouse=True)
def host():
    H.setup_host()


@pytest.fixture
def clip() -> comfy.sd.CLIP:
    return tiny_comfy_vlm.shared()


def caption_node():
    return H.pack_module("nodes.caption").XPSRCaption


def caption_graph(clip_source: list | None, batch: int = 2, tokens: int = 6, **settings) -> dict:
    """XPSR Caption fed by ``clip_source`` (a node output, or None for nothing connected) feeding the tiny XPSR
    graph; ``settings`` are XPSR Caption's other inputs."""
    prompt = H.graph(height=16, width=16, batch=batch, scale=2.0, seed=tokens)
    caption = {"image": ["4", 0], "high_level_instruction": HIGH, "low_level_instruction": LOW,
               "max_new_tokens": tokens, "keep_loaded": False, **settings}
    if clip_source is not None:
        caption["clip"] = clip_source
    prompt |= {"30": {"class_type": NODE, "inputs": {}}, "21": {"class_type": "XPSRCaption", "inputs": caption}}
    prompt["3"]["inputs"] |= {"high_level": ["21", 0], "low_level": ["21", 1]}
    return prompt


def loaded(clip: comfy.sd.CLIP) -> bool:
    return any(m.model is clip.patcher for m in mm.current_loaded_models)


@H.text_generation
def test_each_caption_is_what_comfyuis_generate_text_node_writes_for_that_image_with_sampling_off(clip):
    from comfy_extras.nodes_textgen import TextGenerate

    images = H.test_image(24, 24, batch=3, seed=1)
    high, low = caption_node().execute(images, HIGH, LOW, 7, True, low_level_max_new_tokens=4, clip=clip).result

    def generate_text(instruction: str, tokens: int, index: int) -> str:
        return TextGenerate.execute(clip, instruction, tokens, {"sampling_mode": "off"},
                                    image=images[index:index + 1]).result[0]

    assert high == [clean_caption(generate_text(HIGH, 7, i)) for i in range(3)]
    assert low == [clean_caption(generate_text(LOW, 4, i)) for i in range(3)]
    assert len(set(high)) == 3 and all(high + low), "every image gets a caption of its own"


@H.text_generation
def test_a_batch_is_captioned_as_its_images_one_at_a_time_and_pictures_as_images(clip):
    vlm = H.pack_module("nodes.comfy_vlm")
    images = (H.test_image(24, 24, batch=3, seed=2) * 255).round() / 255  # 8-bit values, as pictures hold
    batch = vlm.caption_images(clip, images, HIGH, 6)
    assert batch == [vlm.caption_images(clip, images[i:i + 1], HIGH, 6)[0] for i in range(3)]
    to_pil = H.pack_module("nodes.caption").to_pil
    assert vlm.caption_images(clip, [to_pil(image) for image in images], HIGH, 6) == batch


@H.text_generation
def test_generate_decodes_greedily_once_per_image_and_instruction_with_each_token_limit(clip, monkeypatch):
    calls = []
    generate = comfy.sd.CLIP.generate

    def spy(self, tokens, **kwargs):
        calls.append(kwargs)
        return generate(self, tokens, **kwargs)

    monkeypatch.setattr(comfy.sd.CLIP, "generate", spy)
    images = H.test_image(24, 24, batch=2, seed=3)
    first = caption_node().execute(images, HIGH, LOW, 5, True, low_level_max_new_tokens=3, clip=clip).result
    assert calls == [{"do_sample": False, "max_length": 5}] * 2 + [{"do_sample": False, "max_length": 3}] * 2
    again = caption_node().execute(images, HIGH, LOW, 5, True, low_level_max_new_tokens=3, clip=clip).result
    assert again == first


@H.text_generation
def test_clip_captions_feed_dual_prompt_encode_one_per_image():
    executor, _ = H.run_ok(caption_graph(["30", 0], batch=2))
    high, low = H.outputs(executor, "21")[:2]
    assert len(high) == len(low) == 2 and all(high + low)
    assert H.output(executor, "3")[0][0].shape[0] == 2
    assert H.output(executor, "5").shape == (2, 32, 32, 3)


@H.text_generation
@pytest.mark.parametrize("keep_loaded", [False, True])
def test_comfyui_places_the_clips_model_while_captioning_and_it_is_offloaded_after_unless_kept(clip, keep_loaded):
    mm.unload_all_models()
    during = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: during.append(loaded(clip)))
    try:
        caption_node().execute(H.test_image(24, 24, batch=2), HIGH, LOW, 3, keep_loaded, clip=clip)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert during and all(during)
    assert loaded(clip) == keep_loaded
    mm.unload_all_models()


@H.text_generation
def test_progress_counts_every_image_of_both_instructions_on_one_bar(clip):
    progress = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress.append((value, total)))
    try:
        caption_node().execute(H.test_image(24, 24, batch=3), HIGH, LOW, 4, True, clip=clip)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    captioned = [value for value, total in progress if total == 6]
    assert captioned[0] == 1 and captioned[-1] == 6 and captioned == sorted(captioned)


@H.text_generation
def test_an_interrupt_stops_before_the_next_image_and_the_next_run_works(monkeypatch):
    generated = []
    generate = comfy.sd.CLIP.generate

    def interrupt_after_the_first(self, tokens, **kwargs):
        generated.append(kwargs)
        ids = generate(self, tokens, **kwargs)
        mm.interrupt_current_processing(True)
        return ids

    monkeypatch.setattr(comfy.sd.CLIP, "generate", interrupt_after_the_first)
    executor, server = H.run(caption_graph(["30", 0], batch=3, tokens=8))
    assert not executor.success and any(event == "execution_interrupted" for event, _ in server.messages)
    assert len(generated) == 1
    monkeypatch.undo()
    H.run_ok(caption_graph(["30", 0], batch=1, tokens=9))


@H.text_generation
def test_beam_search_is_refused_on_the_clip_route_naming_the_inputs(clip):
    with pytest.raises(ValueError, match="set low_level_num_beams to 1 and low_level_repetition_penalty to 1.0 "
                                         r"\(got 5 and 1.5\), or connect mllm from XPSR MLLM Loader"):
        caption_node().execute(H.test_image(24, 24), HIGH, LOW, 3, True, low_level_num_beams=5,
                               low_level_repetition_penalty=1.5, clip=clip)


def test_neither_mllm_nor_clip_is_a_clear_error():
    executor, _ = H.run(caption_graph(None, tokens=10))
    assert not executor.success
    assert ("XPSR Caption captions with mllm (from XPSR MLLM Loader) or clip (a CLIP whose model generates text from "
            "images, e.g. Qwen3-VL loaded with Load CLIP): connect exactly one; neither is connected"
            ) in H.error_message(executor)


def test_both_mllm_and_clip_is_a_clear_error():
    mllm = H.pack_module("nodes.caption").MLLM(caption_model=None, patcher=None)
    with pytest.raises(ValueError, match="connect exactly one; both are connected"):
        caption_node().execute(H.test_image(24, 24), HIGH, LOW, 3, False, mllm=mllm, clip=H.make_clip())


@H.text_generation
def test_a_clip_whose_model_only_encodes_is_refused_saying_so():
    executor, _ = H.run(caption_graph(["1", 1], tokens=11))
    assert not executor.success
    assert ("clip: expected a CLIP whose model generates text from images, e.g. Qwen3-VL loaded with Load CLIP; this "
            "CLIP's model (SD1ClipModel) cannot generate text from images") in H.error_message(executor)


def test_without_comfyuis_text_generation_the_clip_input_says_this_comfyui_has_no_such_route(monkeypatch):
    """Runs as it is on hosts without the route (0.3.64); where ComfyUI has it, the route is taken away first."""
    if H.pack_module("nodes.host_compat").host_generates_text():
        monkeypatch.delattr(comfy.sd.CLIP, "generate")
    executor, _ = H.run(caption_graph(["1", 1], tokens=12))
    assert not executor.success
    assert ("clip: expected a CLIP whose model generates text from images, e.g. Qwen3-VL loaded with Load CLIP; this "
            "ComfyUI has no such route") in H.error_message(executor)
