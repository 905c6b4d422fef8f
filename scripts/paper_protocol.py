"""The paper's test protocol in one command: upscale each test set, score it, and compare with Table 1.

    COMFYUI_PATH=/path/to/ComfyUI [torchrun --nproc_per_node N] python scripts/paper_protocol.py \\
        --sets data/RealSR data/DRealSR data/DIV2K-Val --output results \\
        --checkpoint v1-5-pruned-emaonly.safetensors --xpsr xpsr_fp16.safetensors [upscale_folder options]

Each set is laid out as the official test script expects (<set>/LR, <set>/HR, and the caption folders
highlevel_prompt/ and lowlevel_prompt_q/ for --captions txt). Its LR images are upscaled by
scripts/upscale_folder.py's code into <output>/<set>/ (sharded under torchrun, resuming where results exist),
then rank 0 scores them against HR with xpsr_core.evaluation.evaluate and writes <output>/<set>.md: the run's
means beside XPSR's numbers in the paper's Table 1, naming every metric skipped and why, and
<output>/<set>.csv per image. Any other option is upscale_folder.py's (e.g. --steps, --cfg, --captions).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))

from xpsr_core import sharding  # noqa: E402
from xpsr_core.evaluation import evaluate, paper  # noqa: E402


def upscale_folder():
    """scripts/upscale_folder.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("upscale_folder", REPO / "scripts" / "upscale_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="scripts/paper_protocol.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", required=True, nargs="+", type=Path,
                        help="test set folders, each with LR/ and HR/ (named RealSR, DRealSR or DIV2K-Val to be "
                             "compared with the paper)")
    parser.add_argument("--output", required=True, type=Path, help="folder for <set>/ results and <set>.md tables")
    parser.add_argument("--metrics", default=",".join(evaluate.ALL_METRICS),
                        help=f"comma-separated subset of {','.join(evaluate.ALL_METRICS)} (default: all)")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels cropped from each side for PSNR/SSIM")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="local weights for a learned metric (pyiqa's pretrained_model_path)")
    args, upscale_argv = parser.parse_known_args(argv)
    for folder in args.sets:
        for part in ("LR", "HR"):
            if not (folder / part).is_dir():
                parser.error(f"--sets {folder} has no {part} folder: expected <set>/LR and <set>/HR as the official "
                             "test script reads them")
    if len({folder.name for folder in args.sets}) < len(args.sets):
        parser.error("--sets: two sets share a folder name; their results would share <output>/<name>")
    args.metric_list = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in args.metric_list if m not in evaluate.ALL_METRICS]
    if unknown:
        parser.error(f"--metrics: unknown metric {unknown[0]!r}; expected some of {','.join(evaluate.ALL_METRICS)}")
    return args, upscale_argv


def upscale_args(batch, folder: Path, output: Path, upscale_argv: list[str]) -> argparse.Namespace:
    """upscale_folder.py's arguments for one set: its LR folder into <output>/<set>."""
    return batch.parse_args(["--input", str(folder / "LR"), "--output", str(output / folder.name), *upscale_argv])


def score(folder: Path, output: Path, args: argparse.Namespace, reports: list[sharding.Report]) -> Path:
    """Rank 0's part: score a set's results and write <output>/<set>.md (and .csv)."""
    failed = sorted(f for r in reports for f in r.failed)
    table = output / f"{folder.name}.md"
    if failed:
        report = evaluate.Report(skipped={m: f"{len(failed)} images were not upscaled; rerun to resume, then score"
                                          for m in args.metric_list})
    else:
        report = evaluate.evaluate(output / folder.name, folder / "HR", args.metric_list, args.crop_border,
                                   evaluate.parse_weights(args.weights))
        report.write_csv(output / f"{folder.name}.csv")
    table.write_text(paper.comparison(folder.name, report, failed))
    return table


def run(args: argparse.Namespace, upscale_argv: list[str], batch, core, base: dict, ranks: sharding.Ranks) -> int:
    """Every set upscaled by all ranks, then scored by rank 0; 1 when an image failed or a set could not be scored."""
    status = 0
    for folder in args.sets:
        shard = batch.upscale(upscale_args(batch, folder, args.output, upscale_argv), core, base, ranks)
        reports = sharding.gather(shard, ranks)
        if reports is None:
            continue
        print(sharding.summary(reports, f"{folder.name}: upscaled", "image"), flush=True)
        try:
            table = score(folder, args.output, args, reports)
        except ValueError as e:
            print(f"error: {folder.name}: {e}", file=sys.stderr)
            status = 1
            continue
        print(table.read_text(), flush=True)
        status |= any(r.failed for r in reports)
    return int(status)


def main(argv: list[str] | None = None) -> int:
    args, upscale_argv = parse_args(argv)
    batch = upscale_folder()
    first = upscale_args(batch, args.sets[0], args.output, upscale_argv)
    ranks = sharding.ranks_from_env()
    sharding.start(ranks)
    core = batch.start_comfy(first.cpu, ranks)
    base = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": first.checkpoint}}
    try:
        return run(args, upscale_argv, batch, core, base, ranks)
    finally:
        sharding.stop()


if __name__ == "__main__":
    sys.exit(main())
