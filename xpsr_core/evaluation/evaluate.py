"""``python -m xpsr_core.evaluation.evaluate --pred DIR --gt DIR``: the paper's metrics for a folder of results.

Writes a markdown table and a CSV (one row per image plus the mean) and says which metrics
were skipped and why. PSNR/SSIM always run; the learned metrics run through pyiqa when it
and their weights are on disk (``--weights lpips=/path/to/weights.pth``), never downloading.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..pipeline.image import IMAGE_SUFFIXES
from .metrics import FULL_REFERENCE, LEARNED, LOWER_IS_BETTER, Unavailable, learned_metric, psnr_y, ssim_y

ALL_METRICS = ("psnr", "ssim", *LEARNED, "fid")


@dataclass
class Report:
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    dataset: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def columns(self) -> list[str]:
        return [m for m in ALL_METRICS if any(m in r for r in self.rows.values()) or m in self.dataset]

    def means(self) -> dict[str, float]:
        out = {m: float(np.mean([r[m] for r in self.rows.values() if m in r])) for m in self.columns()
               if m not in self.dataset}
        return out | self.dataset

    def markdown(self) -> str:
        cols = self.columns()
        arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in cols}
        means = self.means()
        lines = ["| images | " + " | ".join(f"{m.upper()} {arrows[m]}" for m in cols) + " |",
                 "|---|" + "---|" * len(cols),
                 f"| {len(self.rows)} | " + " | ".join(f"{means[m]:.4f}" for m in cols) + " |"]
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- {m.upper()}: {why}" for m, why in self.skipped.items()]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        cols = self.columns()
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *cols])
            for name, row in self.rows.items():
                writer.writerow([name, *(f"{row[m]:.6f}" if m in row else "" for m in cols)])
            means = self.means()
            writer.writerow(["mean", *(f"{means[m]:.6f}" for m in cols)])


def image_pairs(pred_dir: Path, gt_dir: Path) -> list[tuple[Path, Path]]:
    """Prediction/ground-truth files matched by name (extension free), refusing unmatched sets."""
    for name, d in (("--pred", pred_dir), ("--gt", gt_dir)):
        if not d.is_dir():
            raise ValueError(f"{name} {d} is not a folder; expected a folder of images")

    def images(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    preds, gts = images(pred_dir), images(gt_dir)
    missing = sorted(set(gts) - set(preds))
    if not gts:
        raise ValueError(f"--gt {gt_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if missing:
        raise ValueError(f"--pred {pred_dir} lacks predictions for {len(missing)} ground-truth images, e.g. "
                         f"'{missing[0]}'; expected one image per ground-truth name")
    return [(preds[k], gts[k]) for k in sorted(gts)]


def load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def evaluate(pred_dir: Path, gt_dir: Path, metrics: list[str], crop_border: int = 0,
             weights: dict[str, str] | None = None, device: str = "cpu") -> Report:
    weights = weights or {}
    report = Report()
    learned = {}
    for name in metrics:
        if name in LEARNED:
            metric = learned_metric(name, device, weights.get(name))
            if isinstance(metric, Unavailable):
                report.skipped[name] = metric.reason
            else:
                learned[name] = metric
    for pred_path, gt_path in image_pairs(pred_dir, gt_dir):
        pred, gt = load_image(pred_path), load_image(gt_path)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path.name} is {pred.shape[-1]}x{pred.shape[-2]} px but {gt_path.name} is "
                             f"{gt.shape[-1]}x{gt.shape[-2]} px; expected equal sizes")
        row = {}
        if "psnr" in metrics:
            row["psnr"] = float(psnr_y(pred, gt, crop_border))
        if "ssim" in metrics:
            row["ssim"] = float(ssim_y(pred, gt, crop_border))
        with torch.no_grad():
            for name, metric in learned.items():
                args = (pred.to(device), gt.to(device)) if name in FULL_REFERENCE else (pred.to(device),)
                row[name] = float(metric(*args))
        report.rows[pred_path.stem] = row
    if "fid" in metrics:
        fid = learned_metric("fid", device, weights.get("fid"))
        if isinstance(fid, Unavailable):
            report.skipped["fid"] = fid.reason
        else:
            report.dataset["fid"] = float(fid(str(pred_dir), str(gt_dir)))
    return report


def parse_weights(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name not in LEARNED + ("fid",) or not os.path.exists(path):
            raise ValueError(f"--weights {value!r}: expected NAME=PATH with NAME one of {LEARNED + ('fid',)} and an "
                             "existing file")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpsr_core.evaluation.evaluate",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--pred", required=True, type=Path, help="folder of restored images")
    parser.add_argument("--gt", required=True, type=Path, help="folder of ground-truth images (same names)")
    parser.add_argument("--metrics", default=",".join(ALL_METRICS),
                        help=f"comma-separated subset of {','.join(ALL_METRICS)} (default: all)")
    parser.add_argument("--crop-border", type=int, default=0, help="pixels cropped from each side for PSNR/SSIM")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="local weights for a learned metric (pyiqa's pretrained_model_path)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md and results.csv")
    args = parser.parse_args(argv)
    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        parser.error(f"unknown metric {unknown[0]!r}; expected some of {','.join(ALL_METRICS)}")
    try:
        report = evaluate(args.pred, args.gt, metrics, args.crop_border, parse_weights(args.weights), args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = report.markdown()
    print(table, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(table)
        report.write_csv(args.out / "results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
