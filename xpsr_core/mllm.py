"""Captioning with a multimodal LLM from a local Hugging Face folder, as XPSR writes its prompts.

XPSR's high-level and low-level prompts are written by a vision-language model. This module loads
such a model with transformers (4.45 and later, 5.x included) and captions one image the way the
official scripts do: greedy decoding, the LLaVA-1.5 prompt string for LLaVA-1.5 and the processor's
chat template for every other model, and the answer reduced to one clean line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.models.auto import configuration_auto, modeling_auto

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
            f"cannot load the processor of {folder}, a library it needs is missing: {_one_line(exc)}"
        ) from exc
    except Exception as exc:
        raise CaptionModelError(
            f"cannot load the processor of {folder}: expected {_PROCESSOR_FILES} "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from exc
    missing = [part for part in ("image_processor", "tokenizer") if getattr(processor, part, None) is None]
    if missing:
        raise CaptionModelError(
            f"{folder} has no {' and no '.join(missing)} (got a {type(processor).__name__}): "
            f"expected {_PROCESSOR_FILES}"
        )
    return processor


def _one_line(exc: Exception) -> str:
    """transformers' messages span lines; a node shows them in one."""
    return " ".join(str(exc).split())


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
            f"cannot load the model weights in {folder}: {type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def caption_prompt(model: CaptionModel, instruction: str) -> str:
    """The text sent with the image: LLaVA-1.5's official string, otherwise the model's chat template."""
    if model.model_type == "llava":
        return "<image>\nUSER: " + instruction + " \nASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return model.processor.apply_chat_template(
        messages, chat_template=_chat_template(model.processor), add_generation_prompt=True, tokenize=False
    )


def caption_image(
    model: CaptionModel,
    image: Image.Image,
    instruction: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_token: Callable[[], None] | None = None,
) -> str:
    """Caption one image by greedy decoding, as one clean line.

    Greedy (no sampling, one beam) whatever the folder's generation config asks for, so a caption
    depends only on the image, the instruction and the weights. on_token runs after every generated
    token; an exception it raises ends generation and propagates, which is how a host cancels.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    inputs = _model_inputs(model, image, caption_prompt(model, instruction))
    output = model.model.generate(
        **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, temperature=None, top_p=None,
        top_k=None, stopping_criteria=StoppingCriteriaList([_TokenCallback(on_token)] if on_token else []),
    )
    new_tokens = output[0] if model.model.config.is_encoder_decoder else output[0, inputs["input_ids"].shape[1]:]
    return clean_caption(model.processor.tokenizer.decode(new_tokens, skip_special_tokens=True))


def _model_inputs(model: CaptionModel, image: Image.Image, prompt: str) -> dict[str, Any]:
    """Processor output on the model's device, floating tensors in its dtype (the caller may have moved it)."""
    tokenizer = model.processor.tokenizer
    has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
    inputs = model.processor(
        images=image.convert("RGB"), text=prompt, return_tensors="pt", add_special_tokens=not has_bos
    )
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
