"""Measure each compressor's bytes per step, its ratio to no compression, and accuracy.

Runs ``hpcdl train`` once per compression spec with the same data, model,
strategy, rank count and seed, reads each run's ``summary.json``, prints a
table and writes it as Markdown to ``bench/results/<name>.md``.

The full benchmark:

    .venv/bin/python bench/compression.py --ranks 4 --dataset mnist5k --model mlp --epochs 5

A quick check that the harness runs:

    .venv/bin/python bench/compression.py --ranks 2 --dataset digits --epochs 1 --name compression-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

DEFAULT_SPECS = ["none", "fp16", "bf16", "topk:ratio=0.01", "randk:ratio=0.01", "qsgd:levels=8", "signsgd",
                 "powersgd:rank=4"]

# Targets: minimum bytes reduction and maximum accuracy loss in points against "none".
TARGETS = {"topk:ratio=0.01": (40.0, 1.0), "powersgd:rank=4": (30.0, 1.0)}


def run_one(spec: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """Train once with compression ``spec`` and return the run's summary."""
    command = [str(BIN / "hpcdl"), "train", "-n", str(args.ranks), "--strategy", "allreduce",
               "--compression", spec, "--dataset", args.dataset, "--model", args.model,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
               "--momentum", str(args.momentum), "--seed", str(args.seed), "--progress", "off",
               "--run-dir", str(run_dir)]
    env = dict(os.environ, HPCDL_LOG_LEVEL="WARNING", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"run with --compression {spec} failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads((run_dir / "summary.json").read_text())


def table(rows: list[dict], baseline: dict) -> list[str]:
    """Format the results as Markdown table lines."""
    lines = ["| compression | bytes/step | reduction vs none | test accuracy | change (points) | target |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        reduction = baseline["comm_bytes_per_step"] / max(row["comm_bytes_per_step"], 1)
        points = 100 * (row["test_accuracy"] - baseline["test_accuracy"])
        target = ""
        if row["compression"] in TARGETS:
            min_reduction, max_loss = TARGETS[row["compression"]]
            met = reduction >= min_reduction and points >= -max_loss
            target = f"{'met' if met else 'missed'} (>= {min_reduction:.0f}x, within {max_loss:.0f} point)"
        lines.append(f"| `{row['compression']}` | {row['comm_bytes_per_step']:.0f} | {reduction:.1f}x | "
                     f"{row['test_accuracy']:.4f} | {points:+.2f} | {target} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, help="compression specs; 'none' is added")
    parser.add_argument("--name", default="compression", help="writes bench/results/NAME.md")
    args = parser.parse_args()

    specs = ["none"] + [s for s in args.specs if s != "none"]
    work = Path(tempfile.mkdtemp(prefix="hpcdl-bench-compression-"))
    rows = []
    try:
        for i, spec in enumerate(specs):
            summary = run_one(spec, args, work / f"run{i}")
            rows.append(summary)
            print(f"{spec:24s} {summary['comm_bytes_per_step']:12.0f} bytes/step  "
                  f"accuracy {summary['test_accuracy']:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = table(rows, rows[0])
    command = "python " + " ".join(["bench/compression.py"] + sys.argv[1:])
    header = [f"# Compression: {args.dataset}, {args.model}, {args.ranks} ranks, allreduce", "",
              f"Command: `{command}`", "",
              f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}", "",
              "Bytes per step are all bytes hpcdl sent, summed over ranks, divided by the optimizer "
              "steps; they include evaluation and control messages.", ""]
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
