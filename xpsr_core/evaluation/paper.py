"""XPSR's published scores (Qu et al., 2024, Table 1) and a run's scores beside them, one markdown table per set.

The numbers are read from the paper's text as extracted from the PDF (shared/xpsr_paper.txt). In that text the
XPSR column of Table 1 lost its PSNR on every set and its MUSIQ on DIV2K-Val; MUSIQ on RealSR and DRealSR is taken
from the full model's row that Tables 3, 4 and 5 repeat (its SSIM, LPIPS, FID and MANIQA equal Table 1's). What
the text does not give is shown as "n/a" and named under the table, never guessed.
"""

from __future__ import annotations

import re

from .evaluate import Report
from .metrics import LOWER_IS_BETTER

COLUMNS = ("psnr", "ssim", "lpips", "dists", "fid", "maniqa", "clipiqa", "musiq")
"""Table 1's metrics, in its order."""

TABLE1 = {
    "RealSR": {"ssim": 0.6870, "lpips": 0.3517, "dists": 0.2471, "fid": 141.95, "maniqa": 0.6059, "clipiqa": 0.7354,
               "musiq": 70.23},
    "DRealSR": {"ssim": 0.7220, "lpips": 0.3864, "dists": 0.2606, "fid": 164.68, "maniqa": 0.5713,
                "clipiqa": 0.7360, "musiq": 67.84},
    "DIV2K-Val": {"ssim": 0.5627, "lpips": 0.3761, "dists": 0.2217, "fid": 33.38, "maniqa": 0.6080,
                  "clipiqa": 0.7816},
}
"""XPSR's row of Table 1 for each test set; a metric missing here is not legible in the paper's text."""


def paper_set(folder_name: str) -> str | None:
    """The Table 1 set a dataset folder holds, by its name (case, '-', '_' and spaces ignored), or None."""
    key = re.sub(r"[^a-z0-9]", "", folder_name.lower())
    return next((name for name in TABLE1 if re.sub(r"[^a-z0-9]", "", name.lower()) == key), None)


def _cell(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def comparison(set_name: str, report: Report, not_upscaled: list[tuple[str, str]]) -> str:
    """The run's mean scores beside the paper's, with everything left out named: metrics skipped and why, the
    paper's illegible numbers, and images that could not be upscaled."""
    paper_name = paper_set(set_name)
    ours = report.means()
    paper = TABLE1.get(paper_name, {}) if paper_name else {}
    header = " | ".join(f"{m.upper()} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in COLUMNS)
    lines = [f"## {set_name}", "", f"| | images | {header} |", "|---|---|" + "---|" * len(COLUMNS),
             f"| this run | {len(report.rows)} | " + " | ".join(_cell(ours.get(m)) for m in COLUMNS) + " |"]
    if paper_name:
        lines.append(f"| XPSR, paper Table 1 ({paper_name}) | | " + " | ".join(_cell(paper.get(m)) for m in COLUMNS)
                     + " |")
    notes = [f"- {m.upper()} not scored: {why}" for m, why in report.skipped.items()]
    notes += [f"- {m.upper()} not scored: not asked for" for m in COLUMNS if m not in ours and m not in report.skipped]
    if paper_name:
        illegible = [m.upper() for m in COLUMNS if m not in paper]
        if illegible:
            notes.append(f"- paper's {', '.join(illegible)} for {paper_name}: not legible in the paper's text")
    else:
        notes.append(f"- no paper numbers: {set_name!r} is not one of Table 1's sets ({', '.join(TABLE1)})")
    notes += [f"- {name} not upscaled: {why}" for name, why in not_upscaled]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
