"""Upscale a folder of LR images through the real XPSR nodes in ComfyUI's executor, headless.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/upscale_folder.py --input DATASET/LR --output RESULTS \\
        --checkpoint v1-5-pruned-emaonly.safetensors --xpsr xpsr_fp16.safetensors [--captions txt|mllm|none]

Every image runs the graph of workflows/xpsr_manual_prompts.json (or, with --captions mllm,
the MLLM graph) in one PromptExecutor, so models load once and evaluation measures exactly
what ComfyUI users get. Captions come from the official dataset layout (``--captions txt``:
highlevel_prompt/ and lowlevel_prompt_q/ beside LR/), from an MLLM under models/LLM, or are
empty. Results are written as <output>/<name>.png, ready for ``python -m xpsr_core.evaluate``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLER_DEFAULTS = {"scale": 4.0, "process_size": 512, "seed": 0, "steps": 20, "cfg": 4.5, "sampler_name": "ddpm",
                    "scheduler": "xpsr_official", "start": "official", "denoise": 1.0, "control_strength": 1.0,
                    "tile_size": 320, "tile_overlap": 8, "vae_tiling": "auto", "color_fix": "adain"}
"""The XPSR Sampler node's defaults, needed for the options before ComfyUI is imported; a host test keeps them
equal to the node's."""
PACK_MODULE = str(REPO).replace(".", "_x_")
"""The module name ComfyUI gives this pack when it loads it from REPO."""


def prompt_settings(prompts) -> dict:
    """XPSR Dual Prompt Encode's official settings (``prompts`` is the pack's xpsr_core.prompts)."""
    return {"added_prompt": prompts.ADDED_PROMPT, "negative_high": prompts.NEGATIVE_HIGH,
            "negative_low": prompts.NEGATIVE_LOW, "token_mode": "official", "lowlevel_cfg": "official"}


def build_prompt(image: Path, base: dict, xpsr_model: str, sampler: dict, prompts: dict,
                 high_level: str = "", low_level: str = "", mllm: str | None = None,
                 instructions: tuple[str, str] = ("", "")) -> dict:
    """The API prompt for one image; ``base`` is the node giving MODEL, CLIP and VAE (a checkpoint loader)."""
    prompt = {
        "1": base,
        "2": {"class_type": "XPSRLoader", "inputs": {"model": ["1", 0], "xpsr_model": xpsr_model,
                                                      "weight_dtype": "auto"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": str(image.resolve())}},
        "6": {"class_type": "XPSRDualPromptEncode", "inputs": {"clip": ["1", 1], "high_level": high_level,
                                                                "low_level": low_level, **prompts}},
        "7": {"class_type": "XPSRSampler", "inputs": {"model": ["2", 0], "xpsr_controlnet": ["2", 1],
                                                       "positive": ["6", 0], "negative": ["6", 1], "image": ["3", 0],
                                                       "vae": ["1", 2], **sampler}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    if mllm:
        prompt["4"] = {"class_type": "XPSRMLLMLoader", "inputs": {"model": mllm, "dtype": "auto",
                                                                   "trust_remote_code": False}}
        prompt["5"] = {"class_type": "XPSRCaption", "inputs": {
            "mllm": ["4", 0], "image": ["3", 0], "high_level_instruction": instructions[0],
            "low_level_instruction": instructions[1], "max_new_tokens": 170, "keep_loaded": True}}
        prompt["6"]["inputs"] |= {"high_level": ["5", 0], "low_level": ["5", 1]}
    return prompt


def captions_for(image: Path, source: str, captions) -> tuple[str, str]:
    """The image's official caption files when asked for (``captions`` is the pack's xpsr_core.captions)."""
    if source != "txt":
        return "", ""
    paths = captions.caption_paths(image)
    return captions.read_caption(paths.high_level), captions.read_caption(paths.low_level)


class _Server:
    """What PromptExecutor needs of ComfyUI's server when there is none."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        if event == "execution_error":
            print(f"  error in {data['node_type']}: {data['exception_message'].strip()}", file=sys.stderr)

    def queue_updated(self):
        pass


def run_folder(images: list[Path], output: Path, make_prompt, executor=None) -> list[Path]:
    """Run the prompt of every image and save the XPSR Sampler's image as <output>/<name>.png."""
    import execution

    to_pil = importlib.import_module(f"{PACK_MODULE}.nodes.caption").to_pil

    output.mkdir(parents=True, exist_ok=True)
    executor = executor or execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
    written = []
    for i, image in enumerate(images):
        prompt = make_prompt(image)
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise ValueError(f"{image.name}: the graph does not validate: {valid[1]['message']} {valid[3]}")
        asyncio.run(executor.execute_async(prompt, prompt_id, extra_data={}, execute_outputs=valid[2]))
        if not executor.success:
            raise RuntimeError(f"{image.name}: XPSR failed (see the error above)")
        result = executor.caches.outputs.get("7")[0][0]
        for b, picture in enumerate(result):
            name = image.stem if len(result) == 1 else f"{image.stem}_{b}"
            path = output / f"{name}.png"
            to_pil(picture).save(path)
            written.append(path)
        print(f"[{i + 1}/{len(images)}] {image.name} -> {path.name}")
    return written


def start_comfy(cpu: bool):
    """ComfyUI's modules with the pack loaded as ComfyUI loads custom nodes; returns the pack's core package."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = cpu
    import nodes
    import utils.extra_config

    extra = Path(os.environ["COMFYUI_PATH"]) / "extra_model_paths.yaml"
    if extra.is_file():
        utils.extra_config.load_extra_path_config(str(extra))
    if not asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError("the XPSR pack failed to load into ComfyUI (see the log above)")
    return importlib.import_module(f"{PACK_MODULE}.xpsr_core")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/upscale_folder.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="folder of LR images (e.g. <set>/LR)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results (<name>.png)")
    parser.add_argument("--checkpoint", required=True, help="SD1.5 checkpoint name in models/checkpoints")
    parser.add_argument("--xpsr", required=True, help="XPSR file or folder name in models/xpsr")
    parser.add_argument("--captions", choices=("txt", "mllm", "none"), default="txt",
                        help="txt: the official caption files beside LR/; mllm: caption with --mllm; none: empty")
    parser.add_argument("--mllm", default="llava-hf/llava-1.5-7b-hf", help="MLLM folder in models/LLM")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    for key, value in SAMPLER_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                            help=f"XPSR Sampler's {key} (default {value})")
    args = parser.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to your ComfyUI folder")
    if not args.input.is_dir():
        parser.error(f"--input {args.input} is not a folder")
    images = sorted(p for p in args.input.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not images:
        parser.error(f"--input {args.input} holds no images")
    sampler = {k: getattr(args, k) for k in SAMPLER_DEFAULTS}
    base = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}}
    core = start_comfy(args.cpu)
    captions = importlib.import_module(f"{core.__name__}.captions")
    prompts = prompt_settings(importlib.import_module(f"{core.__name__}.prompts"))

    def make_prompt(image: Path) -> dict:
        high, low = captions_for(image, args.captions, captions)
        return build_prompt(image, base, args.xpsr, sampler, prompts, high, low,
                            args.mllm if args.captions == "mllm" else None,
                            (captions.HIGH_LEVEL_INSTRUCTION, captions.LOW_LEVEL_INSTRUCTION))

    try:
        run_folder(images, args.output, make_prompt)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
