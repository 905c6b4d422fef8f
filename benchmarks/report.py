"""How every benchmark keeps what it measured: results.json and its markdown rendering, written again after each
part, so that a run cut short by a time limit (benchmarks/gpu.sh, a device lease) keeps what it measured."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def save(out: Path, results: dict, markdown: Callable[[dict], str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
