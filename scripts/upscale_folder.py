"""Upscale a folder of LR images through the real XPSR nodes in ComfyUI's executor, headless.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/upscale_folder.py --input DATASET/LR --output RESULTS \\
        --checkpoint v1-5-pruned-emaonly.safetensors --xpsr xpsr_fp16.safetensors [--captions txt|mllm|none]

Every image runs the graph of workflows/xpsr_manual_prompts.json (or, with --captions mllm,
the MLLM graph) in one PromptExecutor, so models load once and evaluation measures exactly
what ComfyUI users get. Captions come from the official dataset layout (``--captions txt``:
highlevel_prompt/ and lowlevel_prompt_q/ beside LR/), from an MLLM under models/LLM, or are
empty. Results are written as <output>/<name>.png, ready for ``python -m xpsr_core.evaluation.evaluate``.

Each image's seed comes from --seed and its file name, results that exist are skipped (a crashed run resumes)
and an image that fails is reported without stopping the others. Under ``torchrun --nproc_per_node N`` every
process runs its own executor on its own device (cuda:LOCAL_RANK; the CPU with --cpu) over every N-th image, so
the results do not depend on N, and rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))

from xpsr_core import sharding  # noqa: E402  (torch only; ComfyUI is imported once the device is chosen)
from xpsr_core.errors import one_line  # noqa: E402
from xpsr_core.pipeline.image import IMAGE_SUFFIXES  # noqa: E402

SAMPLER_DEFAULTS = {"scale": 4.0, "process_size": 512, "seed": 0, "steps": 20, "cfg": 4.5, "sampler_name": "ddpm",
                    "scheduler": "xpsr_official", "start": "official", "denoise": 1.0, "control_strength": 1.0,
                    "tile_size": 320, "tile_overlap": 8, "vae_tiling": "auto", "color_fix": "adain"}
"""The XPSR Sampler node's defaults, needed for the options before ComfyUI is imported; a host test keeps them
equal to the node's."""
PACK_MODULE = str(REPO).replace(".", "_x_")
"""The module name ComfyUI gives this pack when it loads it from REPO."""


def prompt_settings(prompts) -> dict:
    """XPSR Dual Prompt Encode's official settings (``prompts`` is the pack's xpsr_core.pipeline.prompts)."""
    return {"added_prompt": prompts.ADDED_PROMPT, "negative_high": prompts.NEGATIVE_HIGH,
            "negative_low": prompts.NEGATIVE_LOW, "token_mode": "official", "lowlevel_cfg": "official"}


def build_prompt(image: Path, base: dict, xpsr_model: str, sampler: dict, prompts: dict,
                 high_level: str = "", low_level: str = "", mllm: str | None = None,
                 instructions: tuple[str, str] = ("", "")) -> dict:
    """The API prompt for one image, which LoadImage reads from ComfyUI's input folder (``run_folder`` points that
    at the image's folder for its run); ``base`` is the node giving MODEL, CLIP and VAE (a checkpoint loader)."""
    prompt = {
        "1": base,
        "2": {"class_type": "XPSRLoader", "inputs": {"model": ["1", 0], "xpsr_model": xpsr_model,
                                                      "weight_dtype": "auto"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image.name}},
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


def output_path(output: Path, image: Path) -> Path:
    """Where an image's result goes; a result that exists there means the image is done."""
    return output / f"{image.stem}.png"


def captions_for(image: Path, source: str, captions) -> tuple[str, str]:
    """The image's official caption files when asked for (``captions`` is the pack's xpsr_core.captioning.captions)."""
    if source != "txt":
        return "", ""
    paths = captions.caption_paths(image)
    return captions.read_caption(paths.high_level), captions.read_caption(paths.low_level)


class HeadlessServer:
    """What PromptExecutor needs of ComfyUI's server when there is none (errors stay in its status_messages)."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


def headless_executor():
    """A PromptExecutor without a server (the pack loaded); it keeps loaded models and cached outputs between
    prompts."""
    return importlib.import_module(f"{PACK_MODULE}.nodes.host_compat").prompt_executor(HeadlessServer())


def execute(executor, prompt: dict) -> None:
    """Validate and run an API prompt; a graph that does not validate or fails raises with the node's error."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise ValueError(f"the graph does not validate: {valid[1]['message']} {valid[3]}")
    asyncio.run(executor.execute_async(prompt, prompt_id, extra_data={}, execute_outputs=valid[2]))
    if not executor.success:
        errors = [f"{data['node_type']}: {data['exception_message']}" for event, data in executor.status_messages
                  if event == "execution_error"]
        raise RuntimeError(errors[-1] if errors else "the graph failed")


@contextlib.contextmanager
def input_folder(folder: Path) -> Iterator[None]:
    """ComfyUI's input folder pointed at ``folder`` for a while, as ``main.py --input-directory`` points it.

    LoadImage reads only from the input folder: an absolute path elsewhere validated on 0.3.64
    but is refused as path traversal by later ComfyUI releases.
    """
    import folder_paths

    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(folder))
    try:
        yield
    finally:
        folder_paths.set_input_directory(previous)


def upscale_one(executor, image: Path, prompt: dict, output: Path) -> list[Path]:
    """Run one image's prompt and save the XPSR Sampler's image(s); a failure raises with its reason.

    Each result is written under a temporary name and renamed, so a run killed mid-write leaves no result that a
    resumed run would take for done.
    """
    to_pil = importlib.import_module(f"{PACK_MODULE}.nodes.caption").to_pil
    with input_folder(image.parent):
        execute(executor, prompt)
    outputs = importlib.import_module(f"{PACK_MODULE}.nodes.host_compat").node_outputs(executor, "7")
    result = outputs[0][0]
    paths = [output_path(output, image)] if len(result) == 1 else [output / f"{image.stem}_{b}.png"
                                                                   for b in range(len(result))]
    for picture, path in zip(result, paths, strict=True):
        to_pil(picture).save(path.with_name(f".{path.name}.partial"), format="PNG")
    for path in paths:
        path.with_name(f".{path.name}.partial").replace(path)
    return paths


def run_folder(images: list[Path], output: Path, make_prompt, ranks: sharding.Ranks = sharding.Ranks(),
               executor=None) -> sharding.Report:
    """Upscale this rank's share of ``images`` to <output>/<name>.png, skipping those done; failures are reported
    in the result, never raised, so one bad image does not stop the others."""
    output.mkdir(parents=True, exist_ok=True)
    executor = executor or headless_executor()
    report = sharding.Report(rank=ranks.rank)
    mine = sharding.shard(images, ranks)
    for i, image in enumerate(mine, 1):
        progress = f"{ranks.label()}[{i}/{len(mine)}] {image.name}"
        if output_path(output, image).exists():
            report.skipped.append(image.name)
            print(f"{progress}: done before, skipped", flush=True)
            continue
        start = time.perf_counter()
        try:
            written = upscale_one(executor, image, make_prompt(image), output)
        except Exception as e:  # noqa: BLE001 - any failure of one image is reported and the run goes on
            report.failed.append((image.name, one_line(e) or type(e).__name__))
            print(f"{progress}: failed: {report.failed[-1][1]}", file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - start
        report.done.append((image.name, seconds))
        print(f"{progress} -> {', '.join(p.name for p in written)} ({seconds:.1f} s)", flush=True)
    return report.finish()


def start_comfy(cpu: bool, ranks: sharding.Ranks = sharding.Ranks()):
    """ComfyUI's modules with the pack loaded as ComfyUI loads custom nodes, on this rank's device; returns the
    pack's core package.

    The rank's GPU becomes the current CUDA device before ComfyUI's model management is imported, since that
    picks torch's current device for everything it loads.
    """
    device = sharding.device(ranks, cpu)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    import utils.extra_config

    import nodes

    extra = Path(os.environ["COMFYUI_PATH"]) / "extra_model_paths.yaml"
    if extra.is_file():
        utils.extra_config.load_extra_path_config(str(extra))
    if not asyncio.run(nodes.load_custom_node(str(REPO), ignore=set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError("the XPSR pack failed to load into ComfyUI (see the log above)")
    return importlib.import_module(f"{PACK_MODULE}.xpsr_core")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
                            help=f"XPSR Sampler's {key} (default {value})" + (
                                "; each image's seed is derived from it and the image's name" if key == "seed" else ""))
    args = parser.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to your ComfyUI folder")
    if not args.input.is_dir():
        parser.error(f"--input {args.input} is not a folder")
    if not list_images(args.input):
        parser.error(f"--input {args.input} holds no images")
    return args


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def upscale(args: argparse.Namespace, core, base: dict, ranks: sharding.Ranks) -> sharding.Report:
    """This rank's share of --input upscaled with ``base`` (the node giving MODEL, CLIP and VAE)."""
    captions = importlib.import_module(f"{core.__name__}.captioning.captions")
    prompts = prompt_settings(importlib.import_module(f"{core.__name__}.pipeline.prompts"))

    def make_prompt(image: Path) -> dict:
        high, low = captions_for(image, args.captions, captions)
        sampler = {k: getattr(args, k) for k in SAMPLER_DEFAULTS} | {"seed": sharding.image_seed(args.seed, image.name)}
        return build_prompt(image, base, args.xpsr, sampler, prompts, high, low,
                            args.mllm if args.captions == "mllm" else None,
                            (captions.HIGH_LEVEL_INSTRUCTION, captions.LOW_LEVEL_INSTRUCTION))

    return run_folder(list_images(args.input), args.output, make_prompt, ranks)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ranks = sharding.ranks_from_env()
    sharding.start(ranks)
    core = start_comfy(args.cpu, ranks)
    base = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": args.checkpoint}}
    return sharding.finish(upscale(args, core, base, ranks), ranks, "upscaled", "image")


if __name__ == "__main__":
    sys.exit(main())
