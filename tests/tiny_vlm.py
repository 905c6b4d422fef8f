"""Tiny random-weight vision-language models with the real architectures and processors.

The captioning code is tested on what a user has under ComfyUI/models/LLM/: a Hugging Face folder
written by save_pretrained. Downloading real models is impossible here, so each factory builds
the real model class and the real processor with tiny sizes and a tokenizer trained offline on a
fixed corpus, seeded so that the same folder comes out every time.

The language-model head gives special tokens and unprintable bytes a zero logit while the other
logits are random, so generation never stops early on an end-of-sequence token (tests can count the
tokens produced against max_new_tokens) and captions are printable text.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

SEED = 0
VOCAB_SIZE = 384
IMAGE_SIZE = 32
PATCH_SIZE = 8
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
QWEN_PIXELS = 56 * 56

CORPUS = [
    "The image shows a red house with a white door and a small garden in front of it.",
    "A dog is running on the green grass under a clear blue sky.",
    "Two people are sitting at a wooden table near a large window.",
    "The photo is blurry, with strong noise, low contrast and dull colors.",
    "The lighting is dark and the details of the texture are lost.",
    "Please describe the quality of this image and evaluate it based on factors such as clarity, color, "
    "noise, and lighting.",
    "Please provide a descriptive summary of the content of this image.",
    "Describe and evaluate the quality of the image.",
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
    "A city street at night with cars, lights, buildings and a bridge over the river.",
]

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]

VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""The LLaVA-1.5 conversation format (USER: <image>\\n... ASSISTANT:) as a chat template."""

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's ChatML template, images as <|vision_start|><|image_pad|><|vision_end|>."""


def _train_tokenizer(specials: list[str], bos: str | None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer


def llava_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: <s> prepended, </s> ends, <image> marks the image."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(LLAVA_SPECIALS, bos="<s>"), unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", pad_token="<pad>", additional_special_tokens=["<image>"], chat_template=chat_template,
        model_input_names=["input_ids", "attention_mask"],
    )


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A Qwen2 tokenizer (the class Qwen2VLProcessor insists on in 4.x): no BOS, <|im_end|> ends a turn."""
    return Qwen2TokenizerFast(
        tokenizer_object=_train_tokenizer(QWEN_SPECIALS, bos=None), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIALS[1:], chat_template=QWEN_TEMPLATE,
    )


def _clip_vision() -> dict:
    return {
        "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 32,
    }


def _llama_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    return {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }


def _llava_processor_kwargs(cls: type) -> dict:
    """CLIP's class token counts as one more image token; 4.x hard-codes that, 5.x asks for it."""
    kwargs = {"patch_size": PATCH_SIZE, "vision_feature_select_strategy": "default"}
    if "num_additional_image_tokens" in inspect.signature(cls.__init__).parameters:
        kwargs["num_additional_image_tokens"] = 1
    return kwargs


def _readable_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    return [i for i in range(len(tokenizer)) if (text := tokenizer.decode([i])).isascii() and text.isprintable()]


def _only_readable_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """A zero logit for special tokens and unprintable bytes, random ones elsewhere.

    EOS is then never the argmax, so generation runs to max_new_tokens, and captions are readable.
    """
    head = model.get_output_embeddings()
    silenced = torch.ones(head.weight.shape[0], dtype=torch.bool)
    silenced[_readable_token_ids(tokenizer)] = False
    silenced[tokenizer.all_special_ids] = True
    with torch.no_grad():
        head.weight[silenced] = 0.0


def _save(model: torch.nn.Module, processor, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    _only_readable_tokens(model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava(folder: Path) -> Path:
    """LLaVA-1.5: CLIP vision tower (32 px, patch 8), two-layer projector, Llama text model."""
    tokenizer = llava_tokenizer(VICUNA_TEMPLATE)
    config = LlavaConfig(
        vision_config=_clip_vision(), text_config=_llama_text(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=VICUNA_TEMPLATE,
        **_llava_processor_kwargs(LlavaProcessor),
    )
    return _save(model, processor, tokenizer, Path(folder))


def build_llava_next(folder: Path) -> Path:
    """LLaVA-NeXT: the LLaVA parts plus any-resolution tiling over tiny grid pinpoints."""
    tokenizer = llava_tokenizer(VICUNA_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=_clip_vision(), text_config=_llama_text(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=VICUNA_TEMPLATE,
        **_llava_processor_kwargs(LlavaNextProcessor),
    )
    return _save(model, processor, tokenizer, Path(folder))


def _qwen_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    """Written in the layout of the released config.json, which both 4.x and 5.x read."""
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig.from_dict({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
        "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
        "vision_config": {
            "depth": 1, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    })


def _qwen_needs_video_processor() -> bool:
    return "video_processor" in inspect.signature(Qwen2VLProcessor.__init__).parameters


def qwen2_vl_unavailable() -> str | None:
    """Why Qwen2-VL's processor cannot be built here, or None: transformers 5 needs torchvision for it."""
    if _qwen_needs_video_processor() and not is_torchvision_available():
        return "transformers 5 builds Qwen2-VL's processor with a video processor, which needs torchvision"
    return None


def _qwen_processor(tokenizer: Qwen2TokenizerFast) -> Qwen2VLProcessor:
    image_processor = Qwen2VLImageProcessor(min_pixels=QWEN_PIXELS, max_pixels=QWEN_PIXELS)
    kwargs = {}
    if _qwen_needs_video_processor():
        from transformers import Qwen2VLVideoProcessor

        kwargs["video_processor"] = Qwen2VLVideoProcessor(min_pixels=QWEN_PIXELS, max_pixels=QWEN_PIXELS)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE, **kwargs)


def build_qwen2_vl(folder: Path) -> Path:
    """Qwen2-VL: one-block vision transformer, 56x56 px images (4 merged image tokens), Qwen2 text model.

    The generation config is the released one: sampling switched on with near-greedy settings, which
    captioning must override to plain greedy decoding.
    """
    tokenizer = qwen_tokenizer()
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(_qwen_config(tokenizer)).eval()
    generation = model.generation_config
    generation.do_sample, generation.temperature, generation.top_k, generation.top_p = True, 0.01, 1, 0.001
    generation.eos_token_id = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return _save(model, _qwen_processor(tokenizer), tokenizer, Path(folder))


def build_text_llm(folder: Path) -> Path:
    """A plain Llama causal LM with its tokenizer: a folder that is not a vision-language model."""
    tokenizer = llava_tokenizer()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _llama_text(tokenizer).items() if k != "model_type"}))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl}


REMOTE_CODE = '''\
from pathlib import Path

from transformers import LlavaConfig, LlavaForConditionalGeneration

Path({marker!r}).write_text("the folder's code ran")


class TinyRemoteLlavaConfig(LlavaConfig):
    model_type = "tiny_remote_llava"


class TinyRemoteLlava(LlavaForConditionalGeneration):
    config_class = TinyRemoteLlavaConfig
'''


def build_remote_code_llava(folder: Path, marker: Path) -> Path:
    """The tiny LLaVA under a model_type only its shipped code knows; importing that code writes ``marker``.

    A test sees from the marker whether the folder's Python code ran. The folder's name becomes the module
    name transformers imports the code under, so each folder needs a name of its own.
    """
    folder = build_llava(Path(folder))
    # the weights in the class's own names: transformers renames LLaVA's saved keys by model_type, which is new here
    weights = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    save_file({key: value.contiguous() for key, value in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config |= {"model_type": "tiny_remote_llava", "architectures": ["TinyRemoteLlava"],
               "auto_map": {"AutoConfig": "modeling_tiny_remote.TinyRemoteLlavaConfig",
                            "AutoModelForImageTextToText": "modeling_tiny_remote.TinyRemoteLlava"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modeling_tiny_remote.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    return folder
