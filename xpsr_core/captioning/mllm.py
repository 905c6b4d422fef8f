"""Captioning with a multimodal LLM from a local Hugging Face folder, as XPSR writes its prompts.

XPSR's high-level and low-level prompts are written by a vision-language model. This module loads
such a model with transformers (4.45 and later, 5.x included) and captions images the way the
official scripts do: greedy decoding (or the official low-level captioner's beam search), the LLaVA-1.5
prompt string for LLaVA-1.5 and the processor's chat template for every other model, and the answer
reduced to one clean line. Many images are captioned in one left-padded batch, which under greedy
decoding gives each image the caption it gets alone.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.models.auto import configuration_auto, modeling_auto

from ..errors import one_line

DEFAULT_MAX_NEW_TOKENS = 170
"""The official LLaVA captioning length."""

MAX_FOLDER_DEPTH = 3
"""How deep list_model_folders looks: <org>/<name> from the hub's naming, plus one level of grouping."""

VLM_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
"""The auto classes of image-and-text-to-text models, newest first; 5.x has only the first, 4.44 only the second."""

_MAPPING_NAMES = {
    "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "AutoModelForVision2Seq": "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
}

_DTYPE_KEYWORD = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
"""from_pretrained took torch_dtype until 4.56, which renamed it dtype and deprecated the old name."""

_PROCESSOR_FILES = (
    "an image processor config (preprocessor_config.json, or processor_config.json from transformers 5) and "
    "tokenizer files (tokenizer.json or tokenizer.model, with tokenizer_config.json)"
)


class CaptionModelError(ValueError):
    """A model folder that cannot be used for captioning; the message names the folder and what was expected."""


@dataclass
class CaptionModel:
    """A loaded vision-language model with its processor; model_type decides how prompts are built."""

    model: transformers.PreTrainedModel
    processor: transformers.ProcessorMixin
    model_type: str
    path: Path


def list_model_folders(base: str | Path) -> list[str]:
    """Model folders below base, as relative posix paths, so a node can offer them by name.

    A folder counts when it holds a config.json; its own sub-folders are parts of that model and are
    not searched. Hidden folders are skipped and a missing base gives an empty list.
    """
    base = Path(base)
    return sorted(_find_model_folders(base, base, 1)) if base.is_dir() else []


def _find_model_folders(base: Path, folder: Path, depth: int) -> list[str]:
    found = []
    for child in folder.iterdir():
        if not child.is_dir() or child.name.startswith("."):
            continue
        if (child / "config.json").is_file():
            found.append(child.relative_to(base).as_posix())
        elif depth < MAX_FOLDER_DEPTH:
            found.extend(_find_model_folders(base, child, depth + 1))
    return found


def load_caption_model(
    path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> CaptionModel:
    """Load a local vision-language model on the CPU in eval mode; the caller moves it to a device.

    dtype None keeps the dtype the weights were saved in. Nothing is downloaded: the folder must hold
    everything. trust_remote_code runs Python files shipped in the folder and is off unless asked for.
    """
    folder = Path(path)
    raw_config = _read_raw_config(folder)
    model_type = raw_config["model_type"]
    auto_class = _vlm_auto_class(folder, raw_config, trust_remote_code)
    processor = _load_processor(folder, trust_remote_code)
    if model_type != "llava":
        _require_chat_template(folder, processor, model_type)
    model = _load_model(folder, auto_class, dtype, trust_remote_code)
    return CaptionModel(model=model.eval(), processor=processor, model_type=model_type, path=folder)


def _read_raw_config(folder: Path) -> dict:
    """The config.json as written, read before transformers so that errors can say what the folder is."""
    if not folder.is_dir():
        raise CaptionModelError(f"model folder {folder} does not exist: expected a Hugging Face model folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CaptionModelError(
            f"{folder} has no config.json: expected a Hugging Face model folder as save_pretrained writes it "
            f"(config.json, weights, {_PROCESSOR_FILES})"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionModelError(f"{config_file} is not a readable JSON config: {exc}") from exc
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise CaptionModelError(f"{config_file} has no model_type: expected a transformers model config")
    return raw


def _vlm_auto_class(folder: Path, raw_config: dict, trust_remote_code: bool) -> Any:
    """The auto class to load with, or an error saying why the folder is not a usable vision-language model."""
    model_type = raw_config["model_type"]
    auto_map = raw_config.get("auto_map") or {}
    if model_type in configuration_auto.CONFIG_MAPPING_NAMES:
        return _native_vlm_auto_class(folder, model_type, raw_config)
    if not auto_map:
        raise CaptionModelError(
            f"{folder}: model_type {model_type!r} is unknown to transformers {transformers.__version__} and the "
            "folder ships no code for it (no auto_map in config.json); a newer transformers may know it"
        )
    auto_class = _remote_vlm_auto_class(folder, model_type, auto_map)
    if not trust_remote_code:
        raise CaptionModelError(
            f"{folder}: model_type {model_type!r} needs the Python code shipped in the folder (auto_map in "
            "config.json); enable trust_remote_code to load it, which runs that code on this machine"
        )
    return auto_class


def _native_vlm_auto_class(folder: Path, model_type: str, raw_config: dict) -> Any:
    for name in VLM_AUTO_CLASSES:
        auto_class = getattr(transformers, name, None)
        mapping = getattr(modeling_auto, _MAPPING_NAMES[name], {})
        if auto_class is not None and model_type in mapping:
            return auto_class
    architectures = ", ".join(raw_config.get("architectures") or []) or "no architectures listed"
    raise CaptionModelError(
        f"{folder} is not a vision-language model: its model_type is {model_type!r} ({architectures}), which "
        f"transformers {transformers.__version__} cannot load as an image-text-to-text model; expected a model "
        "such as LLaVA, LLaVA-NeXT or Qwen2-VL"
    )


def _remote_vlm_auto_class(folder: Path, model_type: str, auto_map: dict) -> Any:
    """The auto class the shipped code registers for image-text-to-text, read from config.json alone.

    Decided before any shipped code runs, so a folder that could never caption here (the official Q-Instruct
    InternLM-XComposer-VL registers only AutoModel and AutoModelForCausalLM, with a generate of its own) is
    refused with what it provides, whether or not its code is trusted.
    """
    for name in VLM_AUTO_CLASSES:
        if name in auto_map and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    raise CaptionModelError(
        f"{folder}: the code shipped for model_type {model_type!r} provides the auto classes "
        f"{', '.join(sorted(auto_map))} but no image-text-to-text model ({' or '.join(VLM_AUTO_CLASSES)}), so it "
        "cannot caption images here; caption with the model's own scripts instead and read their caption files "
        "in the official layout (highlevel_prompt/, lowlevel_prompt_q/ beside LR/)"
    )


def _load_processor(folder: Path, trust_remote_code: bool) -> Any:
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise CaptionModelError(
            f"cannot load the processor of {folder}, a library it needs is missing: {one_line(exc)}"
        ) from exc
    except Exception as exc:
        raise CaptionModelError(
            f"cannot load the processor of {folder}: expected {_PROCESSOR_FILES} "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from exc
    missing = [part for part in ("image_processor", "tokenizer") if getattr(processor, part, None) is None]
    if missing:
        raise CaptionModelError(
            f"{folder} has no {' and no '.join(missing)} (got a {type(processor).__name__}): "
            f"expected {_PROCESSOR_FILES}"
        )
    return processor


def _chat_template(processor: Any) -> str | None:
    """The processor's template, else the tokenizer's: older folders keep it in tokenizer_config.json."""
    return getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)


def _require_chat_template(folder: Path, processor: Any, model_type: str) -> None:
    if not _chat_template(processor):
        raise CaptionModelError(
            f"{folder} has no chat template, which model_type {model_type!r} needs to be prompted: expected "
            "chat_template.json or chat_template.jinja, or a chat_template in tokenizer_config.json"
        )


def _load_model(folder: Path, auto_class: Any, dtype: torch.dtype | None, trust_remote_code: bool) -> Any:
    kwargs = {_DTYPE_KEYWORD: "auto" if dtype is None else dtype}
    try:
        return auto_class.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise CaptionModelError(
            f"cannot load the model weights in {folder}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc


def caption_prompt(model: CaptionModel, instruction: str) -> str:
    """The text sent with the image: LLaVA-1.5's official string, otherwise the model's chat template."""
    if model.model_type == "llava":
        return "<image>\nUSER: " + instruction + " \nASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return model.processor.apply_chat_template(
        messages, chat_template=_chat_template(model.processor), add_generation_prompt=True, tokenize=False
    )


@dataclass(frozen=True)
class Decoding:
    """How a caption is decoded. The default is the official LLaVA-1.5 high-level captioning: greedy, 170 tokens.

    The official low-level captioner (Q-Instruct InternLM-XComposer-VL) searches 5 beams with a repetition
    penalty of 1.5 and a length penalty of 1.0 for up to 500 new tokens (OFFICIAL_LOW_LEVEL). Never sampled,
    so a caption depends only on the image, the instruction and the weights.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0 (1.0: none), got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict[str, Any]:
        """generate's decoding arguments; the length penalty only where beams use it (transformers warns otherwise)."""
        kwargs = {"do_sample": False, "num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                  "repetition_penalty": self.repetition_penalty, "temperature": None, "top_p": None, "top_k": None}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs


OFFICIAL_LOW_LEVEL = Decoding(max_new_tokens=500, num_beams=5, repetition_penalty=1.5, length_penalty=1.0)
"""The official Q-Instruct XComposer gen_config (num_beams=5, do_sample=False, min_length=1, repetition_penalty=1.5,
length_penalty=1.0, max_new_tokens=500); min_length=1 is what generation does anyway."""

DEFAULT_BATCH_SIZE = 8
"""Images captioned in one generate call: LLaVA-1.5-7B in fp16 needs about 0.4 GB of cache per 170-token caption."""

_log = logging.getLogger(__name__)


def caption_image(
    model: CaptionModel,
    image: Image.Image,
    instruction: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_token: Callable[[], None] | None = None,
) -> str:
    """Caption one image by greedy decoding, as one clean line (a batch of one of caption_batch)."""
    return caption_batch(model, [(image, instruction)], Decoding(max_new_tokens=max_new_tokens), on_token)[0]


def caption_batch(
    model: CaptionModel,
    requests: Sequence[tuple[Image.Image, str]],
    decoding: Decoding = Decoding(),
    on_token: Callable[[], None] | None = None,
) -> list[str]:
    """Caption (image, instruction) pairs in one generate call, one clean line each, in order.

    The prompts are padded on the left by the processor's own batching, so every answer starts right after its
    prompt and, under greedy decoding, equals the answer the pair gets alone. Decoding ignores whatever the
    folder's generation config asks for. on_token runs after every generation step; an exception it raises ends
    generation and propagates, which is how a host cancels.
    """
    if not requests:
        return []
    inputs = _model_inputs(model, [image for image, _ in requests],
                           [caption_prompt(model, instruction) for _, instruction in requests])
    output = model.model.generate(
        **inputs, **decoding.generate_kwargs(),
        stopping_criteria=StoppingCriteriaList([_TokenCallback(on_token)] if on_token else []),
    )
    new_tokens = output if model.model.config.is_encoder_decoder else output[:, inputs["input_ids"].shape[1]:]
    texts = model.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [clean_caption(text) for text in texts]


def caption_rows(
    model: CaptionModel,
    pictures: Iterable[Image.Image],
    instructions: Sequence[tuple[str, Decoding]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_token: Callable[[], None] | None = None,
) -> Iterator[list[str]]:
    """Each picture's captions, one per (instruction, decoding), generated batch_size pictures at a time.

    Instructions decoded alike share one generate call (2 x batch_size sequences for XPSR's two greedy prompts);
    others get a call each. A generator, so a dataset is written batch by batch and an interrupt keeps what is
    done. Out of memory halves the batch and retries it, down to one picture; there it propagates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[Decoding, list[int]] = {}
    for index, (_, decoding) in enumerate(instructions):
        groups.setdefault(decoding, []).append(index)
    pending = iter(pictures)
    while chunk := list(islice(pending, batch_size)):
        while chunk:
            part = chunk[:batch_size]
            try:
                rows = _caption_part(model, part, instructions, groups, on_token)
            except torch.OutOfMemoryError:
                if len(part) == 1:
                    raise
                batch_size = len(part) // 2
                _free_cached_memory()
                _log.warning("out of memory captioning %d images at once with %s; retrying %d at a time",
                             len(part), model.path.name, batch_size)
                continue
            yield from rows
            chunk = chunk[len(part):]


def _caption_part(model: CaptionModel, pictures: list[Image.Image], instructions: Sequence[tuple[str, Decoding]],
                  groups: dict[Decoding, list[int]], on_token: Callable[[], None] | None) -> list[list[str]]:
    rows: list[list[str]] = [[""] * len(instructions) for _ in pictures]
    for decoding, indices in groups.items():
        requests = [(picture, instructions[i][0]) for i in indices for picture in pictures]
        answers = iter(caption_batch(model, requests, decoding, on_token))
        for i in indices:
            for row in rows:
                row[i] = next(answers)
    return rows


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_advice(model: CaptionModel) -> str:
    """What to try when even one picture does not fit, for the node and the command alike."""
    return (f"out of memory while captioning with {model.path.name}, even one image at a time: try dtype fp16 or "
            "bf16, a smaller model (e.g. Qwen2-VL-2B-Instruct), fewer max_new_tokens or beams, and keep_loaded off "
            "on other MLLM nodes")


def _model_inputs(model: CaptionModel, images: list[Image.Image], prompts: list[str]) -> dict[str, Any]:
    """Processor output for a left-padded batch on the model's device, floating tensors in its dtype."""
    tokenizer = model.processor.tokenizer
    has_bos = tokenizer.bos_token is not None and prompts[0].startswith(tokenizer.bos_token)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = model.processor(images=[image.convert("RGB") for image in images], text=prompts,
                                 return_tensors="pt", padding=True, add_special_tokens=not has_bos)
    finally:
        tokenizer.padding_side = padding_side
    device, dtype = model.model.device, model.model.dtype
    return {key: _to_model(value, device, dtype) for key, value in inputs.items()}


def _to_model(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)


class _TokenCallback(StoppingCriteria):
    """Calls back once per generation step without ever stopping; raising from the callback aborts generate."""

    def __init__(self, on_token: Callable[[], None]) -> None:
        self.on_token = on_token

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.on_token()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


_LAST_ASSISTANT = re.compile(r"\bASSISTANT:")
_LEADING_ROLE = re.compile(r"^\s*assistant[ \t]*(?::|\r?\n)", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """One line without the answer's role header, as the official script leaves a caption.

    The official script keeps what follows the last "ASSISTANT:" of the decoded text (the prompt's
    own, when the whole sequence was decoded); chat models may also open with an "assistant" header
    line, in any case. Line breaks become spaces so the caption fits the
    one-line caption files.
    """
    matches = list(_LAST_ASSISTANT.finditer(text))
    if matches:
        text = text[matches[-1].end():]
    text = _LEADING_ROLE.sub("", text, count=1)
    return " ".join(text.split())
