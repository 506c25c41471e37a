"""Benchmark hpcdl against Horovod on the same ranks: all-reduce bus bandwidth and training throughput.

Part 1 times hpcdl's ring, the vendor MPI_Allreduce and Horovod's allreduce for
each message size, in one MPI job, and reports bus bandwidth as nccl-tests
defines it: busbw = size / time * 2(N-1)/N.

Part 2 trains the same model on the same data and ranks twice: with
``hpcdl train --allreduce ring``, and with a plain loop around
``horovod.torch.DistributedOptimizer``. Both throughputs are global samples per
second of wall time over the training steps.

Run from the repository root after ``make horovod``:

    .venv/bin/python bench/horovod_peer.py --ranks 4

It prints the ratios and writes the Markdown table to bench/results/horovod.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ALGORITHMS = ("ring", "mpi", "horovod")


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


# Rank-side parts, run under mpiexec.

def measure_busbw(sizes: list[int], iterations: int, warmup: int) -> None:
    """Print one JSON line per (size, algorithm) on rank 0 with time and bus bandwidth."""
    import torch
    from mpi4py import MPI

    from hpcdl.comm import Communicator

    comm = Communicator()
    factor = 2 * (comm.size - 1) / comm.size
    for nbytes in sizes:
        # Zeros stay zeros under summation, so repeated reductions never overflow.
        tensor = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32)
        for algorithm in ALGORITHMS:
            for _ in range(warmup):
                comm.allreduce(tensor, algorithm=algorithm)
            comm.comm.Barrier()
            start = time.perf_counter()
            for _ in range(iterations):
                comm.allreduce(tensor, algorithm=algorithm)
            local_s = (time.perf_counter() - start) / iterations
            slowest_s = comm.comm.allreduce(local_s, op=MPI.MAX)
            if comm.rank == 0:
                size = tensor.numel() * 4
                print(json.dumps({"bytes": size, "algorithm": algorithm, "time_s": slowest_s,
                                  "busbw_gbps": size / slowest_s * factor / 1e9}), flush=True)


def train_with_horovod(args: argparse.Namespace) -> None:
    """Train like ``hpcdl train`` does, in a plain loop with ``horovod.torch.DistributedOptimizer``."""
    import horovod.torch as hvd
    import torch

    from hpcdl.data import GlobalBatchSampler, load_dataset
    from hpcdl.models import build_model, loss_function

    hvd.init()
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset, seed=args.seed)
    model = build_model(args.model, data, hidden=args.hidden)
    loss_fn = loss_function(data.task)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    sampler = GlobalBatchSampler(len(data.x_train), args.batch_size, hvd.rank(), hvd.size(), seed=args.seed)

    samples = 0
    start = time.perf_counter()
    for step in range(args.steps):
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        loss_fn(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        samples += len(batch)
    elapsed_s = time.perf_counter() - start
    total = hvd.allreduce(torch.tensor([samples], dtype=torch.float64), op=hvd.Sum).item()
    slowest_s = hvd.allreduce(torch.tensor([elapsed_s], dtype=torch.float64), op=hvd.Max).item()
    if hvd.rank() == 0:
        print(json.dumps({"samples": total, "wall_time_s": slowest_s, "samples_per_s": total / slowest_s}),
              flush=True)


# Driver, run once outside MPI.

def _mpiexec(ranks: int, command: list[str], timeout_s: float) -> str:
    env = dict(os.environ, HPCDL_LOG_LEVEL=os.environ.get("HPCDL_LOG_LEVEL", "WARNING"))
    full = [str(BIN / "mpiexec"), "-n", str(ranks), *command]
    result = subprocess.run(full, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s)
    if result.returncode != 0:
        sys.exit(f"failed with exit status {result.returncode}: {' '.join(full)}\n{result.stderr[-3000:]}")
    return result.stdout


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _train_args(args: argparse.Namespace) -> list[str]:
    return ["--dataset", args.dataset, "--model", args.model, "--hidden", str(args.hidden),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--momentum", str(args.momentum), "--seed", str(args.seed)]


def run_benchmark(args: argparse.Namespace) -> None:
    script = str(Path(__file__).resolve())
    python = sys.executable
    sizes = ",".join(str(_parse_size(text)) for text in args.sizes.split(","))

    busbw = _json_lines(_mpiexec(args.ranks, [python, script, "--part", "busbw", "--sizes", sizes,
                                              "--iterations", str(args.iterations)], args.timeout_s))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "hpcdl"
        _mpiexec(args.ranks, [str(BIN / "hpcdl"), "train", *_train_args(args), "--allreduce", "ring",
                              "--progress", "off", "--run-dir", str(run_dir)], args.timeout_s)
        hpcdl_summary = json.loads((run_dir / "summary.json").read_text())
    horovod = _json_lines(_mpiexec(args.ranks, [python, script, "--part", "train-horovod", *_train_args(args)],
                                   args.timeout_s))[0]

    report = _format_report(args, busbw, hpcdl_summary, horovod)
    out = ROOT / "bench" / "results" / "horovod.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out.relative_to(ROOT)}")


def _format_report(args: argparse.Namespace, busbw: list[dict], hpcdl_summary: dict, horovod: dict) -> str:
    command = "python bench/horovod_peer.py " + " ".join(sys.argv[1:])
    lines = [f"## hpcdl and Horovod, {args.ranks} ranks", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}", "",
             "### All-reduce bus bandwidth (GB/s; busbw = size / time * 2(N-1)/N)", "",
             "| size (bytes) | ring | MPI_Allreduce | Horovod | ring / Horovod | ring / MPI |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_size: dict[int, dict[str, float]] = {}
    for row in busbw:
        by_size.setdefault(row["bytes"], {})[row["algorithm"]] = row["busbw_gbps"]
    for size, rates in sorted(by_size.items()):
        lines.append(f"| {size} | {rates['ring']:.3f} | {rates['mpi']:.3f} | {rates['horovod']:.3f} | "
                     f"{rates['ring'] / rates['horovod']:.2f} | {rates['ring'] / rates['mpi']:.2f} |")
    ratio = hpcdl_summary["samples_per_s"] / horovod["samples_per_s"]
    lines += ["", f"### Training throughput ({args.model} on {args.dataset}, {args.steps} steps, "
                  f"batch {args.batch_size} per rank)", "",
              "| run | samples/s |", "| --- | ---: |",
              f"| hpcdl train --allreduce ring | {hpcdl_summary['samples_per_s']:.1f} |",
              f"| horovod.torch.DistributedOptimizer loop | {horovod['samples_per_s']:.1f} |",
              f"| ratio hpcdl / Horovod (target >= 1.0) | {ratio:.2f} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "busbw", "train-horovod"), default="all",
                        help="'all' runs the benchmark; the other parts are what it starts under mpiexec.")
    parser.add_argument("--ranks", type=int, default=4, help="MPI ranks. [4]")
    parser.add_argument("--sizes", default="4K,64K,1M,16M,64M", help="Message sizes in bytes (K, M, G suffixes).")
    parser.add_argument("--iterations", type=int, default=20, help="Timed all-reduces per size. [20]")
    parser.add_argument("--dataset", default="mnist5k", help="Data set for the training part. [mnist5k]")
    parser.add_argument("--model", default="cnn", help="Model for the training part. [cnn]")
    parser.add_argument("--hidden", type=int, default=128, help="Hidden width of the model. [128]")
    parser.add_argument("--steps", type=int, default=100, help="Training steps. [100]")
    parser.add_argument("--batch-size", type=int, default=32, help="Per-rank batch size. [32]")
    parser.add_argument("--lr", type=float, default=0.05, help="Learning rate. [0.05]")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum. [0.9]")
    parser.add_argument("--seed", type=int, default=0, help="Seed. [0]")
    parser.add_argument("--timeout-s", type=float, default=1800, help="Limit for each MPI job in seconds. [1800]")
    args = parser.parse_args()

    if args.part == "busbw":
        measure_busbw([int(size) for size in args.sizes.split(",")], args.iterations, warmup=3)
    elif args.part == "train-horovod":
        train_with_horovod(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
