"""Training step time per sample, 1 process against N processes under torchrun (DDP, gloo on CPUs, NCCL on GPUs).

    python benchmarks/train_scaling.py [--processes 2] [--batch 4] [--steps 4] [--resolution 128] [--device cpu]

The tiny SD1.5-shaped base and training set of the tests (tests/tiny_sd15.py), the same
global batch in both runs (one process with --batch, N with --batch / N each). On the CPU
every process has one thread, so N processes use N cores where one uses one: the ratio shows
what the data-parallel split gains and its all-reduce costs. Each run is timed by the
difference of a --steps and a 2 x --steps segment after a warm-up, which cancels the checkpoint
each segment ends with. The ratio (N-process over 1-process time per sample) is measured in one
run; results go to <out>/train_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): train, time two segments, and let rank 0 print the seconds per step."""
    import torch
    import torch.distributed as dist

    from xpsr_core.training import Trainer, train_config_from_dict
    from xpsr_core.training.distributed import process_group

    torch.set_num_threads(1)
    config = train_config_from_dict(dict(
        pretrained_model=str(args.root / "tiny-sd15"), train_data_dir=str(args.root / "data"),
        output_dir=str(args.root / f"run-{args.processes}"), resolution=args.resolution, progress_bar=False,
        train_batch_size=args.batch // args.processes, gradient_accumulation_steps=1, max_train_steps=1,
        checkpointing_steps=10**6, lr_warmup_steps=0, device=args.device))
    with process_group(config.device) as ranks:
        trainer = Trainer(config)
        trainer.run()
        seconds = []
        for steps in (args.steps, 2 * args.steps):
            trainer.config = replace(config, max_train_steps=trainer.global_step + steps)
            if ranks.distributed:
                dist.barrier()
            start = time.perf_counter()
            trainer.run()
            if ranks.distributed:
                dist.barrier()
            seconds.append(time.perf_counter() - start)
        if ranks.is_main:
            print("SECONDS_PER_STEP", (seconds[1] - seconds[0]) / args.steps)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds_per_step(args: argparse.Namespace, processes: int) -> float:
    """Launch the worker as one plain process or under torchrun with ``processes`` ranks."""
    worker_args = [str(Path(__file__).resolve()), "--worker", "--root", str(args.root), "--processes", str(processes),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--resolution", str(args.resolution),
                   "--device", args.device]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, *launcher, *worker_args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=args.timeout)
    if run.returncode:
        sys.exit(f"{processes}-process run failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return float(run.stdout.split("SECONDS_PER_STEP")[1].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch per step (the tiny set has 4 pairs)")
    parser.add_argument("--steps", type=int, default=4, help="steps of the shorter timed segment")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed to each run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % args.processes:
        parser.error(f"--batch {args.batch} does not split over {args.processes} processes")
    if args.worker:
        worker(args)
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_sd15 import build_dataset, build_tiny_base

    args.root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    build_tiny_base(args.root)
    build_dataset(args.root / "data", size=args.resolution)
    one, many = seconds_per_step(args, 1), seconds_per_step(args, args.processes)
    result = {"device": args.device, "global_batch": args.batch, "resolution": args.resolution,
              "processes": args.processes, "one_process_s_per_sample": one / args.batch,
              f"{args.processes}_process_s_per_sample": many / args.batch, "ratio": many / one}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"training step per sample ({args.device}, global batch {args.batch}, {args.resolution} px): "
          f"1 process {one / args.batch * 1e3:.1f} ms, {args.processes} processes {many / args.batch * 1e3:.1f} ms, "
          f"ratio {many / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
