"""Captioning with a local vision-language model, and XPSR's caption files.

The models are tiny random-weight LLaVA, LLaVA-NeXT and Qwen2-VL folders built by tiny_vlm with
the real transformers classes and processors, so captions are gibberish but every step a real
model goes through (folder discovery, loading, prompting, greedy generation, decoding) runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="MLLM captioning needs transformers")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import tiny_vlm  # noqa: E402
from xpsr_core.captioning import captions, mllm  # noqa: E402
from xpsr_core.captioning.mllm import CaptionModelError, caption_image, clean_caption, load_caption_model  # noqa: E402

MODEL_FOLDERS = {"llava": "llava-hf/llava-1.5-tiny", "llava_next": "llava-next-tiny", "qwen2_vl": "Qwen/Qwen2-VL-tiny"}
QWEN_UNAVAILABLE = tiny_vlm.qwen2_vl_unavailable()
KINDS = [
    "llava",
    "llava_next",
    pytest.param("qwen2_vl", marks=pytest.mark.skipif(QWEN_UNAVAILABLE is not None, reason=str(QWEN_UNAVAILABLE))),
]
OFFICIAL_LLAVA_PROMPT = (
    "<image>\nUSER: Please provide a descriptive summary of the content of this image. \nASSISTANT:"
)
FEW_TOKENS = 4


class Interrupted(Exception):
    """Stands in for ComfyUI's interrupt exception."""


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ComfyUI/models/LLM with the tiny models under hub-like names, one nested two deep."""
    base = tmp_path_factory.mktemp("comfy") / "models" / "LLM"
    for kind, builder in tiny_vlm.BUILDERS.items():
        if kind != "qwen2_vl" or QWEN_UNAVAILABLE is None:
            builder(base / MODEL_FOLDERS[kind])
    tiny_vlm.build_text_llm(base / "tiny-llama-text")
    return base


@pytest.fixture(scope="module")
def loaded(llm_dir: Path) -> dict[str, mllm.CaptionModel]:
    """Each model loaded once in fp32; tests that change a model load their own."""
    return {
        kind: load_caption_model(llm_dir / folder, dtype=torch.float32)
        for kind, folder in MODEL_FOLDERS.items() if (llm_dir / folder).is_dir()
    }


def images() -> list[Image.Image]:
    """Different sizes and aspect ratios, so every processor resizes, crops or tiles."""
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
    ramp = torch.linspace(0, 255, 64).to(torch.uint8).repeat(32, 1).numpy()
    return [Image.fromarray(noise), Image.fromarray(ramp).convert("RGB"), Image.new("RGB", (30, 30), (200, 40, 40))]


class GenerateSpy:
    """Wraps model.generate to record what it was given and how many tokens it added."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.generate = model.generate
        self.input_ids: list[torch.Tensor] = []
        self.new_tokens: list[int] = []
        self.kwargs: list[dict] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, **kwargs):
        self.input_ids.append(kwargs["input_ids"])
        self.kwargs.append(kwargs)
        output = self.generate(**kwargs)
        self.outputs.append(output)
        self.new_tokens.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output


@pytest.fixture
def spy_generate(monkeypatch: pytest.MonkeyPatch):
    def install(model: mllm.CaptionModel) -> GenerateSpy:
        spy = GenerateSpy(model.model)
        monkeypatch.setattr(model.model, "generate", spy)
        return spy
    return install


@pytest.fixture
def spy_processor(monkeypatch: pytest.MonkeyPatch):
    """Records the texts the processor calls receive, one per prompt of each batch."""
    def install(model: mllm.CaptionModel) -> list[str]:
        texts: list[str] = []
        processor_class = type(model.processor)
        original = processor_class.__call__

        def call(self, *args, **kwargs):
            texts.extend(kwargs["text"])
            return original(self, *args, **kwargs)

        monkeypatch.setattr(processor_class, "__call__", call)
        return texts
    return install


def test_instructions_are_the_official_and_paper_strings() -> None:
    assert captions.HIGH_LEVEL_INSTRUCTION == "Please provide a descriptive summary of the content of this image."
    assert captions.LOW_LEVEL_INSTRUCTION == (
        "Please describe the quality of this image and evaluate it based on factors such as clarity, color, "
        "noise, and lighting."
    )
    assert captions.OFFICIAL_LOW_LEVEL_INSTRUCTION == "Describe and evaluate the quality of the image."


def test_tiny_models_are_rebuilt_identically(tmp_path: Path) -> None:
    """The fixtures are reproducible: the same seed and corpus give the same files."""
    first, second = tiny_vlm.build_llava(tmp_path / "a"), tiny_vlm.build_llava(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_the_tiny_models_are_listed_by_their_hub_like_names(llm_dir: Path) -> None:
    expected = [f for f in MODEL_FOLDERS.values() if (llm_dir / f).is_dir()] + ["tiny-llama-text"]
    assert mllm.list_model_folders(llm_dir) == sorted(expected)


def test_model_folders_are_those_with_a_config_json_up_to_three_deep(tmp_path: Path) -> None:
    for folder in ["org/model", "plain", "group/org/model", "group/org/deeper/too-deep", ".cache/hidden", "plain/part"]:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "readme.md").write_text("")

    assert mllm.list_model_folders(tmp_path) == ["group/org/model", "org/model", "plain"]
    assert mllm.list_model_folders(str(tmp_path / "group")) == ["org/deeper/too-deep", "org/model"]
    assert mllm.list_model_folders(tmp_path / "missing") == []


@pytest.mark.parametrize("kind", KINDS)
def test_loads_on_the_cpu_in_eval_mode(loaded: dict, llm_dir: Path, kind: str) -> None:
    model = loaded[kind]
    assert model.model_type == kind
    assert model.path == llm_dir / MODEL_FOLDERS[kind]
    assert model.model.device.type == "cpu" and model.model.dtype == torch.float32
    assert not model.model.training


@pytest.mark.parametrize("kind", KINDS)
def test_caption_is_deterministic_and_one_clean_line(loaded: dict, kind: str) -> None:
    image = images()[0]
    first = caption_image(loaded[kind], image, captions.HIGH_LEVEL_INSTRUCTION, max_new_tokens=FEW_TOKENS)
    second = caption_image(loaded[kind], image, captions.HIGH_LEVEL_INSTRUCTION, max_new_tokens=FEW_TOKENS)
    assert first == second
    assert first and first == clean_caption(first) and "\n" not in first


@pytest.mark.parametrize("kind", KINDS)
def test_caption_is_the_decoded_answer_without_the_prompt(loaded: dict, spy_generate, kind: str) -> None:
    spy = spy_generate(loaded[kind])
    caption = caption_image(loaded[kind], images()[0], "Summarise the photograph.", max_new_tokens=FEW_TOKENS)
    answer = spy.outputs[0][0, spy.input_ids[0].shape[1]:]
    assert caption == clean_caption(loaded[kind].processor.tokenizer.decode(answer, skip_special_tokens=True))
    assert "photograph" not in caption


def test_special_tokens_are_left_out_of_the_caption(llm_dir: Path) -> None:
    """A head that always answers <pad>: the caption is the text around special tokens, here none."""
    model = load_caption_model(llm_dir / MODEL_FOLDERS["llava"], dtype=torch.float32)
    head = model.model.get_output_embeddings()
    always_pad = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        always_pad.weight.zero_()
        always_pad.bias.zero_()
        always_pad.bias[model.processor.tokenizer.pad_token_id] = 1.0
    model.model.set_output_embeddings(always_pad)
    assert caption_image(model, images()[0], "Describe.", max_new_tokens=3) == ""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_new_tokens", [1, FEW_TOKENS])
def test_generation_stops_at_max_new_tokens(loaded: dict, spy_generate, kind: str, max_new_tokens: int) -> None:
    """The tiny models never emit EOS, so exactly max_new_tokens are generated, greedily."""
    spy = spy_generate(loaded[kind])
    calls = []
    caption_image(
        loaded[kind], images()[1], "Describe.", max_new_tokens=max_new_tokens, on_token=lambda: calls.append(1)
    )
    assert spy.new_tokens == [max_new_tokens]
    assert len(calls) == max_new_tokens
    assert spy.kwargs[0]["do_sample"] is False and spy.kwargs[0]["num_beams"] == 1


def test_default_length_is_the_official_170_tokens(loaded: dict, spy_generate) -> None:
    """Checked on the arguments, the first token aborting, to keep 170 CPU steps out of the suite."""
    spy = spy_generate(loaded["llava"])

    def interrupt() -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        caption_image(loaded["llava"], images()[2], captions.HIGH_LEVEL_INSTRUCTION, on_token=interrupt)
    assert spy.kwargs[0]["max_new_tokens"] == mllm.DEFAULT_MAX_NEW_TOKENS == 170


@pytest.mark.parametrize("kind", KINDS)
def test_each_image_gets_its_own_caption_independent_of_order(loaded: dict, spy_generate, kind: str) -> None:
    spy = spy_generate(loaded[kind])
    pictures = images()
    results = [caption_image(loaded[kind], im, "Describe.", max_new_tokens=FEW_TOKENS) for im in pictures]
    again = caption_image(loaded[kind], pictures[0], "Describe.", max_new_tokens=FEW_TOKENS)
    assert len(results) == len(pictures) and all(isinstance(r, str) and r for r in results)
    assert again == results[0]
    pixel_sums = [float(kwargs["pixel_values"].sum()) for kwargs in spy.kwargs[:3]]
    assert len(set(pixel_sums)) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_loads_and_captions(llm_dir: Path, kind: str) -> None:
    model = load_caption_model(llm_dir / MODEL_FOLDERS[kind], dtype=torch.bfloat16)
    assert model.model.dtype == torch.bfloat16
    caption = caption_image(model, images()[0], "Describe.", max_new_tokens=FEW_TOKENS)
    assert caption and "\n" not in caption


def test_dtype_none_keeps_the_saved_dtype(llm_dir: Path) -> None:
    folder = llm_dir / MODEL_FOLDERS["llava"]
    assert load_caption_model(folder).model.dtype == torch.float32


def test_dtype_keyword_raises_no_deprecation_warning(llm_dir: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    if hasattr(logging.Logger.warning_once, "cache_clear"):
        logging.Logger.warning_once.cache_clear()
    try:
        load_caption_model(llm_dir / MODEL_FOLDERS["llava"], dtype=torch.bfloat16)
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if "dtype" in r.getMessage()]


def test_inputs_follow_the_model_when_the_caller_converts_it(llm_dir: Path, spy_generate) -> None:
    model = load_caption_model(llm_dir / MODEL_FOLDERS["llava_next"], dtype=torch.float32)
    model.model.to(torch.bfloat16)
    spy = spy_generate(model)
    assert caption_image(model, images()[0], "Describe.", max_new_tokens=2)
    assert spy.kwargs[0]["pixel_values"].dtype == torch.bfloat16
    assert spy.kwargs[0]["input_ids"].dtype == torch.long


@pytest.mark.skipif(getattr(transformers, "AutoModelForVision2Seq", None) is None,
                    reason="transformers 5 has no AutoModelForVision2Seq")
def test_without_image_text_to_text_models_load_as_vision2seq(llm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What transformers before AutoModelForImageTextToText (4.44 and older) goes through."""
    monkeypatch.setattr(mllm, "VLM_AUTO_CLASSES", ("AutoModelForVision2Seq",))
    model = load_caption_model(llm_dir / MODEL_FOLDERS["llava"], dtype=torch.float32)
    assert type(model.model).__name__ == "LlavaForConditionalGeneration"
    assert caption_image(model, images()[0], "Describe.", max_new_tokens=2)


def test_llava_gets_the_official_prompt_string(loaded: dict, spy_processor, spy_generate) -> None:
    texts = spy_processor(loaded["llava"])
    spy = spy_generate(loaded["llava"])
    caption_image(loaded["llava"], images()[0], captions.HIGH_LEVEL_INSTRUCTION, max_new_tokens=1)
    assert texts == [OFFICIAL_LLAVA_PROMPT]
    tokenizer = loaded["llava"].processor.tokenizer
    ids = spy.input_ids[0][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] == tokenizer.convert_tokens_to_ids("<image>")


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "llava"])
def test_chat_models_get_their_chat_template_with_a_generation_prompt(loaded: dict, spy_processor, kind: str) -> None:
    texts = spy_processor(loaded[kind])
    caption_image(loaded[kind], images()[0], captions.LOW_LEVEL_INSTRUCTION, max_new_tokens=1)
    expected = {
        "llava_next": "USER: <image>\n" + captions.LOW_LEVEL_INSTRUCTION + " ASSISTANT:",
        "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>" + captions.LOW_LEVEL_INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>assistant\n",
    }
    assert texts == [expected[kind]]


def test_a_template_that_writes_bos_does_not_get_a_second_one(llm_dir: Path, spy_generate) -> None:
    model = load_caption_model(llm_dir / MODEL_FOLDERS["llava_next"], dtype=torch.float32)
    model.processor.chat_template = "{{ bos_token }}" + tiny_vlm.VICUNA_TEMPLATE
    spy = spy_generate(model)
    caption_image(model, images()[0], "Describe.", max_new_tokens=1)
    bos = model.processor.tokenizer.bos_token_id
    ids = spy.input_ids[0][0].tolist()
    assert ids[0] == bos and ids[1] != bos


@pytest.mark.parametrize("kind", KINDS)
def test_raising_on_token_aborts_generation(loaded: dict, spy_generate, kind: str) -> None:
    spy = spy_generate(loaded[kind])
    calls = []

    def interrupt() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        caption_image(loaded[kind], images()[0], "Describe.", max_new_tokens=40, on_token=interrupt)
    assert len(calls) == 3 and spy.new_tokens == []


def test_max_new_tokens_below_one_is_refused(loaded: dict) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        caption_image(loaded["llava"], images()[0], "Describe.", max_new_tokens=0)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A red house with a white door.", "A red house with a white door."),
        ("ASSISTANT: A red house.", "A red house."),
        ("USER: Describe this. \nASSISTANT: A red\nhouse.", "A red house."),
        ("assistant\nA dog on the\n\ngrass.\n", "A dog on the grass."),
        ("Assistant: blurry,   noisy\tand dark", "blurry, noisy and dark"),
        ("Assistant coaches stand by the field.", "Assistant coaches stand by the field."),
        ("  \n  ", ""),
    ],
)
def test_clean_caption_leaves_one_line_without_role_prefix(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelError, match="does not exist") as error:
        load_caption_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_folder_without_config_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelError, match="no config.json") as error:
        load_caption_model(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_text_only_llm_is_not_a_vision_language_model(llm_dir: Path) -> None:
    with pytest.raises(CaptionModelError, match="not a vision-language model.*'llama'.*LlamaForCausalLM"):
        load_caption_model(llm_dir / "tiny-llama-text")


def test_clip_text_encoder_is_not_a_vision_language_model(tmp_path: Path) -> None:
    transformers.CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CaptionModelError, match="not a vision-language model.*'clip_text_model'"):
        load_caption_model(tmp_path)


def copy_without(source: Path, target: Path, removed: tuple[str, ...]) -> Path:
    shutil.copytree(source, target)
    for name in removed:
        (target / name).unlink(missing_ok=True)
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@pytest.mark.parametrize("removed", [TOKENIZER_FILES, IMAGE_PROCESSOR_FILES], ids=["tokenizer", "image_processor"])
def test_missing_processor_files_are_reported(llm_dir: Path, tmp_path: Path, removed: tuple[str, ...]) -> None:
    folder = copy_without(llm_dir / MODEL_FOLDERS["llava"], tmp_path / "llava", removed)
    expected = "cannot load the processor.*expected an image processor.*tokenizer"
    with pytest.raises(CaptionModelError, match=expected) as error:
        load_caption_model(folder)
    assert str(folder) in str(error.value)


def test_missing_weights_are_reported(llm_dir: Path, tmp_path: Path) -> None:
    folder = copy_without(llm_dir / MODEL_FOLDERS["llava"], tmp_path / "llava", ("model.safetensors",))
    with pytest.raises(CaptionModelError, match="cannot load the model weights") as error:
        load_caption_model(folder)
    assert str(folder) in str(error.value)


def without_chat_template(folder: Path) -> Path:
    for name in ("chat_template.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(settings))
    return folder


def test_chat_model_without_chat_template_is_reported(llm_dir: Path, tmp_path: Path) -> None:
    folder = without_chat_template(copy_without(llm_dir / MODEL_FOLDERS["llava_next"], tmp_path / "next", ()))
    with pytest.raises(CaptionModelError, match="no chat template.*'llava_next'"):
        load_caption_model(folder)


def test_llava_needs_no_chat_template(llm_dir: Path, tmp_path: Path) -> None:
    folder = without_chat_template(copy_without(llm_dir / MODEL_FOLDERS["llava"], tmp_path / "llava", ()))
    assert caption_image(load_caption_model(folder), images()[0], "Describe.", max_new_tokens=2)


XCOMPOSER_AUTO_MAP = {
    "AutoConfig": "configuration_tiny.TinyConfig",
    "AutoModel": "modeling_tiny.Tiny",
    "AutoModelForCausalLM": "modeling_tiny.Tiny",
}
"""The auto classes the official low-level captioner (Q-Instruct InternLM-XComposer-VL) registers in its config.json."""


def remote_code_folder(folder: Path, auto_map: dict | None = None) -> Path:
    """A folder whose model_type only its own code knows; that code fails loudly if it is ever run."""
    folder.mkdir()
    config = {
        "model_type": "tiny_remote_vlm",
        "auto_map": auto_map or {"AutoConfig": "configuration_tiny.TinyConfig",
                                 "AutoModelForImageTextToText": "modeling_tiny.Tiny"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny.py").write_text("raise RuntimeError('the folder code must not run')\n")
    return folder


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    folder = remote_code_folder(tmp_path / "remote")
    with pytest.raises(CaptionModelError, match="trust_remote_code.*runs that code") as error:
        load_caption_model(folder)
    assert str(folder) in str(error.value) and "'tiny_remote_vlm'" in str(error.value)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_shipped_code_without_an_image_text_to_text_model_is_refused_naming_its_auto_classes(
        tmp_path: Path, trust_remote_code: bool) -> None:
    folder = remote_code_folder(tmp_path / "xcomposer", XCOMPOSER_AUTO_MAP)
    with pytest.raises(CaptionModelError) as error:
        load_caption_model(folder, trust_remote_code=trust_remote_code)
    assert str(error.value).startswith(
        f"{folder}: the code shipped for model_type 'tiny_remote_vlm' provides the auto classes AutoConfig, AutoModel, "
        "AutoModelForCausalLM but no image-text-to-text model (AutoModelForImageTextToText or AutoModelForVision2Seq), "
        "so it cannot caption images here; caption with the model's own scripts instead")


def test_unknown_model_type_without_code_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_in_transformers"}))
    with pytest.raises(CaptionModelError, match="'not_in_transformers' is unknown to transformers"):
        load_caption_model(tmp_path)


def test_captions_round_trip_in_the_official_layout(loaded: dict, tmp_path: Path) -> None:
    dataset = tmp_path / "RealSR"
    (dataset / "LR").mkdir(parents=True)
    for name, image in zip(["b.png", "a.JPG", "c.webp"], images(), strict=True):
        image.save(dataset / "LR" / name)
    (dataset / "LR" / "notes.txt").write_text("not an image")
    (dataset / "LR" / "sub.png").mkdir()

    lr_images = captions.list_lr_images(dataset)
    assert [p.name for p in lr_images] == ["a.JPG", "b.png", "c.webp"]
    written = {}
    for lr in lr_images:
        paths = captions.caption_paths(lr)
        with Image.open(lr) as image:
            written[lr.stem] = (
                caption_image(loaded["llava"], image, captions.HIGH_LEVEL_INSTRUCTION, max_new_tokens=FEW_TOKENS),
                caption_image(loaded["llava"], image, captions.LOW_LEVEL_INSTRUCTION, max_new_tokens=FEW_TOKENS),
            )
        captions.write_caption(paths.high_level, written[lr.stem][0])
        captions.write_caption(paths.low_level, written[lr.stem][1])

    assert captions.caption_paths(dataset / "LR" / "a.JPG") == captions.CaptionPaths(
        dataset / "highlevel_prompt" / "a.txt", dataset / "lowlevel_prompt_q" / "a.txt"
    )
    for lr in lr_images:
        paths = captions.caption_paths(lr)
        assert (captions.read_caption(paths.high_level), captions.read_caption(paths.low_level)) == written[lr.stem]
        assert paths.high_level.read_text(encoding="utf-8").count("\n") == 1


def test_caption_files_read_like_the_official_reader(tmp_path: Path) -> None:
    path = tmp_path / "highlevel_prompt" / "x.txt"
    captions.write_caption(path, "  A café,\nwith two lines. ")
    assert path.read_text(encoding="utf-8") == "A café, with two lines.\n"
    path.write_text("   first line  \nsecond line\n", encoding="utf-8")
    assert captions.read_caption(path) == "first line  "
    path.write_text("", encoding="utf-8")
    assert captions.read_caption(path) == ""


def test_missing_caption_file_and_lr_folder_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "lowlevel_prompt_q" / "x.txt"
    with pytest.raises(FileNotFoundError, match="lowlevel_prompt_q"):
        captions.read_caption(missing)
    with pytest.raises(FileNotFoundError, match="no LR folder"):
        captions.list_lr_images(tmp_path)


INSTRUCTIONS = [captions.HIGH_LEVEL_INSTRUCTION, captions.LOW_LEVEL_INSTRUCTION]


@pytest.mark.parametrize("kind", KINDS)
def test_a_padded_batch_gives_each_image_the_captions_it_gets_alone(loaded: dict, spy_generate, kind: str) -> None:
    """Three images of different sizes, both instructions (prompts of different lengths) in one generate call."""
    alone = [[caption_image(loaded[kind], image, instruction, max_new_tokens=FEW_TOKENS)
              for instruction in INSTRUCTIONS] for image in images()]
    spy = spy_generate(loaded[kind])
    greedy = mllm.Decoding(max_new_tokens=FEW_TOKENS)
    batched = list(mllm.caption_rows(loaded[kind], images(), [(i, greedy) for i in INSTRUCTIONS], batch_size=3))
    assert batched == alone
    assert [ids.shape[0] for ids in spy.input_ids] == [6]
    attention = spy.kwargs[0]["attention_mask"]
    assert (attention[:, -1] == 1).all() and (attention[:, 0] == 0).any()


def test_batches_hold_batch_size_images_and_keep_their_order(loaded: dict, spy_generate) -> None:
    spy = spy_generate(loaded["llava"])
    greedy = mllm.Decoding(max_new_tokens=2)
    pictures = images() * 2
    rows = list(mllm.caption_rows(loaded["llava"], pictures, [("Describe.", greedy)], batch_size=4))
    assert [ids.shape[0] for ids in spy.input_ids] == [4, 2]
    assert rows == [[caption_image(loaded["llava"], p, "Describe.", max_new_tokens=2)] for p in pictures]


def test_instructions_decoded_differently_get_calls_of_their_own(loaded: dict, spy_generate) -> None:
    spy = spy_generate(loaded["llava"])
    low = mllm.Decoding(max_new_tokens=3, num_beams=2, repetition_penalty=1.5, length_penalty=0.5)
    rows = list(mllm.caption_rows(loaded["llava"], images()[:2], [("Describe.", mllm.Decoding(max_new_tokens=2)),
                                                                   ("Judge the quality.", low)], batch_size=2))
    assert len(rows) == 2 and all(len(row) == 2 and all(row) for row in rows)
    assert [(k["num_beams"], k["repetition_penalty"], k.get("length_penalty")) for k in spy.kwargs] == [
        (1, 1.0, None), (2, 1.5, 0.5)]
    assert spy.new_tokens == [2, 3] and all(k["do_sample"] is False for k in spy.kwargs)


def test_the_official_low_level_decoding_is_q_instructs_gen_config() -> None:
    assert mllm.OFFICIAL_LOW_LEVEL == mllm.Decoding(max_new_tokens=500, num_beams=5, repetition_penalty=1.5,
                                                    length_penalty=1.0)


@pytest.mark.parametrize(("field", "value"), [("max_new_tokens", 0), ("num_beams", 0), ("repetition_penalty", 0.0)])
def test_bad_decoding_settings_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        mllm.Decoding(**{field: value})


def test_out_of_memory_halves_the_batch_and_retries(loaded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = loaded["llava"]
    generate, sizes = model.model.generate, []

    def fits_two(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return generate(**kwargs)

    monkeypatch.setattr(model.model, "generate", fits_two)
    greedy = [("Describe.", mllm.Decoding(max_new_tokens=2))]
    rows = list(mllm.caption_rows(model, images() * 2, greedy, batch_size=5))
    assert sizes == [5, 2, 2, 1, 1]
    monkeypatch.undo()
    assert rows == list(mllm.caption_rows(model, images() * 2, greedy, batch_size=1))


def test_out_of_memory_at_one_image_propagates(loaded: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def never_fits(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loaded["llava"].model, "generate", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        list(mllm.caption_rows(loaded["llava"], images(), [("Describe.", mllm.Decoding())], batch_size=4))
    assert "even one image at a time" in mllm.out_of_memory_advice(loaded["llava"])
