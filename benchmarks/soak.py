"""Hours of use: prompts queued one after another through ComfyUI's own server, and what its process holds after
each of them.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/soak.py [--prompts 24] [--warmup 4] [--out benchmarks/results/soak]

Each scenario starts a fresh server (main.py --cpu on loopback, the pack in custom_nodes) on the model files a user
has (tests/user_models.py: an SD1.5 checkpoint, two XPSR files, a tiny captioner) and queues ``--prompts`` prompts
of shipped API workflows, each with a new seed, the next of three photos (same size, other content) and, without
the captioner, new prompt texts. The scenarios: typed prompts or the captioner (XPSR MLLM Loader + XPSR Caption),
each with one XPSR file throughout or a change of file at every prompt, and, in turn, a large output in latent
tiles and the captioner with a new file every two prompts (``mixed``).

After every prompt tests/server_probe reads the server's process as the next prompt finds it, after a garbage
collection: resident memory, the bytes of all live tensors, ComfyUI's loaded-model bytes and how many model
objects are alive; the time per prompt is the server's own (execution_start to execution_success). Memory held
after the warm-up prompts should stay flat: growth is a measure's peak after the warm-up over its peak during it,
with its slope per prompt. ``--cache`` picks ComfyUI's output cache: ``classic`` keeps the last prompt's outputs
(0.3.64's default), ``host-default`` is the host's default (0.33: RAM-pressure caching). Results go to
results.json and results.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cli
import report

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


@dataclass(frozen=True)
class Scenario:
    """The workflows, taken in turn, one per prompt, and the two XPSR files in turn, each for ``xpsr_run`` prompts
    (0: the first file throughout)."""

    workflows: tuple[str, ...]
    xpsr_run: int = 0

    def workflow(self, index: int) -> str:
        return self.workflows[index % len(self.workflows)]

    def xpsr(self, index: int) -> int:
        return index // self.xpsr_run % 2 if self.xpsr_run else 0

    @property
    def period(self) -> int:
        """After this many prompts every pairing of workflow and file has run."""
        return math.lcm(len(self.workflows), 2 * self.xpsr_run or 1)


TYPED, CAPTIONED, TILED = "xpsr_manual_prompts", "xpsr_mllm_captions", "xpsr_large_image_tiles"
SCENARIOS = {
    "typed_prompts": Scenario((TYPED,)),
    "typed_prompts_switching_xpsr": Scenario((TYPED,), xpsr_run=1),
    "captioner": Scenario((CAPTIONED,)),
    "captioner_switching_xpsr": Scenario((CAPTIONED,), xpsr_run=1),
    "mixed": Scenario((TILED, CAPTIONED), xpsr_run=2),
}
"""``mixed`` is a user going back and forth: a large output in latent tiles (typed prompts) and the captioner in
turn, a new XPSR file every two prompts."""
TILED_AT_CPU_SIZE = {"process_size": 128, "tile_size": 8, "tile_overlap": 2}
"""The large-image workflow's tiling at a size a CPU samples in seconds: a 16 px latent in 9 tiles of 8 px."""
MEASURES = ("resident_bytes", "tensor_bytes", "loaded_bytes")
CACHES = {"classic": ["--cache-classic"], "host-default": []}


def nth_prompt(scenario: Scenario, index: int, images: list[str], models) -> dict:
    """The ``index``-th prompt of a scenario: its own seed, the next photo, its XPSR file, and typed prompts that
    name the prompt (new conditioning every time)."""
    import user_models

    workflow = scenario.workflow(index)
    prompt = user_models.api_workflow(workflow, images[index % len(images)], models,
                                      xpsr=(models.xpsr, models.xpsr_other)[scenario.xpsr(index)], seed=1000 + index,
                                      **TILED_AT_CPU_SIZE if workflow == TILED else {})
    for node in prompt.values():
        if node["class_type"] == "XPSRDualPromptEncode" and isinstance(node["inputs"]["high_level"], str):
            node["inputs"]["high_level"] += f" Photo number {index}."
            node["inputs"]["low_level"] += f" Seen {index} times."
    return prompt


def server_seconds(run) -> float:
    """The prompt's time on the server: its execution_start to its execution_success."""
    stamps = {kind: data["timestamp"] for kind, data in run.messages if kind in ("execution_start",
                                                                                 "execution_success")}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def soak(url: str, scenario: Scenario, prompts: int, images: list[str], models) -> list[dict]:
    """Queue the scenario's prompts one after another; a row per prompt of what the server holds after it, with
    the length of its progress bar (XPSR Sampler's: steps x latent tiles)."""
    from comfy_client import ComfyClient

    client = ComfyClient(url)
    names = [client.upload_image(Path(image)) for image in images]
    rows = []
    for index in range(prompts):
        prompt = nth_prompt(scenario, index, names, models)
        run, = client.run(prompt)
        if run.end != "execution_success":
            errors = [data for kind, data in run.messages if kind == "execution_error"]
            raise RuntimeError(f"prompt {index} ended with {run.end}: {errors}")
        progress = max((data["max"] for kind, data in run.messages if kind == "progress"), default=0)
        rows.append({"prompt": index, "workflow": scenario.workflow(index), "seconds": server_seconds(run),
                     "progress_max": progress} | client.probe(prompt))
    return rows


def slope(values: list[float]) -> float:
    """Least-squares growth per prompt."""
    if len(values) < 2:
        return 0.0
    return statistics.linear_regression(range(len(values)), values).slope


def summary(rows: list[dict], warmup: int) -> dict:
    """For each measure, its peak during the warm-up and after it: memory that keeps growing after the warm-up
    shows as growth (the later peak over the warm-up's) and as a slope per prompt; the time per prompt."""
    warm, settled = rows[:warmup], rows[warmup:]
    result = {"warmup": warmup, "prompts": len(rows), "first_s": rows[0]["seconds"],
              "median_s": statistics.median(row["seconds"] for row in settled), "live_at_end": rows[-1]["live"]}
    for measure in MEASURES:
        warmup_peak, peak = max(row[measure] for row in warm), max(row[measure] for row in settled)
        result[measure] = {"warmup_peak": warmup_peak, "peak": peak, "at_end": rows[-1][measure],
                           "growth": peak - warmup_peak, "per_prompt": slope([row[measure] for row in settled])}
    return result


def markdown(results: dict) -> str:
    mib = 2 ** 20
    lines = [f"ComfyUI {results['host']}, output cache {results['cache']}, {results['prompts']} prompts per scenario "
             f"(the first {results['warmup']} warm up), CPU. Peaks during the warm-up -> after it.", "",
             "| scenario | first prompt s | then s per prompt | resident MiB | resident slope KiB/prompt | "
             "live tensor MiB | live tensor growth bytes | loaded-model MiB at end | live models at end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, scenario in results["scenarios"].items():
        s = scenario["summary"]
        resident, tensors = s["resident_bytes"], s["tensor_bytes"]
        live = ", ".join(f"{key} {value}" for key, value in s["live_at_end"].items())
        lines.append(f"| {name} | {s['first_s']:.1f} | {s['median_s']:.2f} | "
                     f"{resident['warmup_peak'] / mib:.0f} -> {resident['peak'] / mib:.0f} | "
                     f"{resident['per_prompt'] / 1024:.0f} | "
                     f"{tensors['warmup_peak'] / mib:.1f} -> {tensors['peak'] / mib:.1f} | {tensors['growth']} | "
                     f"{s['loaded_bytes']['at_end'] / mib:.0f} | {live} |")
    return "\n".join(lines) + "\n"


def soaks(work: Path, scenarios: list[str], prompts: int, cache: str) -> Iterator[tuple[str, list[dict]]]:
    """Each scenario's rows, from a server of its own on the user's files (written once, in ``work``)."""
    import browser
    import user_models

    models = user_models.write_user_models(work / "models")
    images = [str(user_models.write_lr_photo(work / f"soak_{photo}.png", photo=photo))
              for photo in user_models.PHOTOS]
    for name in scenarios:
        base = work / name
        base.mkdir()
        (base / "models").symlink_to(models.models, target_is_directory=True)
        with browser.comfy_server(base, packs=[REPO / "tests" / "server_probe"], options=CACHES[cache]) as url:
            yield name, soak(url, SCENARIOS[name], prompts, images, models)


def host_version() -> str:
    namespace = {}
    exec((Path(os.environ["COMFYUI_PATH"]) / "comfyui_version.py").read_text(), namespace)
    return namespace["__version__"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24, help="prompts per scenario")
    parser.add_argument("--warmup", type=int, default=4,
                        help="prompts before memory should be flat: at least a scenario's period (mixed: 4), so that "
                             "every pairing of workflow and XPSR file has run once")
    parser.add_argument("--scenarios", type=cli.names_of(tuple(SCENARIOS), "scenario"), default=",".join(SCENARIOS),
                        help=f"some of {','.join(SCENARIOS)}")
    parser.add_argument("--cache", choices=tuple(CACHES), default="classic", help="ComfyUI's output cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout: the soak runs its server")
    scenarios = args.scenarios
    period = max(SCENARIOS[name].period for name in scenarios)
    if not period <= args.warmup < args.prompts:
        parser.error(f"--warmup must be at least {period} (the scenarios' period) and below --prompts "
                     f"({args.prompts}), got {args.warmup}")

    results = {"host": host_version(), "cache": args.cache, "prompts": args.prompts, "warmup": args.warmup,
               "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="xpsr_soak_") as work:
        for name, rows in soaks(Path(work), scenarios, args.prompts, args.cache):
            results["scenarios"][name] = {"rows": rows, "summary": summary(rows, args.warmup)}
            report.save(args.out, results, markdown)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
