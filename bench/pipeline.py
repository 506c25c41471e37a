"""Pipeline bubble and peak activation memory of GPipe and 1F1B against the GPipe formula.

For each stage count P, schedule and micro-batch count M, the script runs
``hpcdl train -n P --pipeline-stages P`` (one data-parallel replica) on the
``transformer`` model and ``pycode`` data, and reads ``summary.json``. The
measured bubble is the time each stage spends waiting for messages over its
step time, averaged over stages, leaving out the first step. Peak activation
memory is the largest number of bytes autograd held saved for backward on a
stage during a step (parameters excluded).

Each row compares the bubble with (P-1)/(M+P-1), and the largest ratio over
stages of 1F1B's peak to the bound (P/M) * GPipe's peak + one micro-batch, where
one micro-batch is GPipe's peak / M. A ratio of at most 1 meets the bound.
With more ranks than cores, time a rank waits for a core counts as bubble.
Run on a machine with at least P idle cores.

Usage:
    .venv/bin/python bench/pipeline.py [--stages 2,4] [--micro-batches 1,2,4,8] [--steps 30]
        [--batch-size 32] [--hidden 64] [--name pipeline]

It prints the table and writes it to ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HPCDL = str(Path(sys.executable).parent / "hpcdl")


def _run(stages: int, schedule: str, micro_batches: int, args: argparse.Namespace, scratch: Path) -> dict:
    run_dir = scratch / f"p{stages}-{schedule}-m{micro_batches}"
    command = [HPCDL, "train", "-n", str(stages), "--dataset", "pycode", "--model", "transformer",
               "--hidden", str(args.hidden), "--pipeline-stages", str(stages), "--pipeline-schedule", schedule,
               "--micro-batches", str(micro_batches), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--log-every", str(args.steps), "--progress", "off",
               "--run-dir", str(run_dir)]
    env = dict(os.environ, HPCDL_LOG_LEVEL="WARNING")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def _rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-pipeline-") as scratch:
        for stages in args.stages:
            for micro_batches in args.micro_batches:
                gpipe = _run(stages, "gpipe", micro_batches, args, Path(scratch))
                one_f_one_b = _run(stages, "1f1b", micro_batches, args, Path(scratch))
                gpipe_peaks = gpipe["peak_activation_bytes_per_stage"]
                bounds = [(stages / micro_batches) * peak + peak / micro_batches for peak in gpipe_peaks]
                memory_ratio = max(peak / bound for peak, bound in
                                   zip(one_f_one_b["peak_activation_bytes_per_stage"], bounds))
                formula = gpipe["pipeline_bubble_formula"]
                rows.append({
                    "P": stages, "M": micro_batches, "formula": formula,
                    "gpipe_bubble": gpipe["pipeline_bubble_fraction"],
                    "1f1b_bubble": one_f_one_b["pipeline_bubble_fraction"],
                    "gpipe_peak_kib": max(gpipe_peaks) / 1024,
                    "1f1b_peak_kib": max(one_f_one_b["peak_activation_bytes_per_stage"]) / 1024,
                    "memory_ratio": memory_ratio,
                })
                print(_format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| P | M | formula (P-1)/(M+P-1) | GPipe bubble | 1F1B bubble | GPipe - formula | 1F1B - formula "
          "| GPipe peak KiB | 1F1B peak KiB | 1F1B peak / bound |")


def _format_row(row: dict) -> str:
    return (f"| {row['P']} | {row['M']} | {row['formula']:.3f} | {row['gpipe_bubble']:.3f} | "
            f"{row['1f1b_bubble']:.3f} | {row['gpipe_bubble'] - row['formula']:+.3f} | "
            f"{row['1f1b_bubble'] - row['formula']:+.3f} | {row['gpipe_peak_kib']:.0f} | "
            f"{row['1f1b_peak_kib']:.0f} | {row['memory_ratio']:.2f} |")


def _markdown(rows: list[dict], args: argparse.Namespace) -> str:
    command = " ".join([".venv/bin/python", "bench/pipeline.py", *sys.argv[1:]])
    lines = [
        "# Pipeline bubble and activation memory",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"Model: transformer, hidden {args.hidden}, on pycode; batch {args.batch_size}, {args.steps} steps per run.",
        "",
        HEADER,
        "|" + "---|" * HEADER.count(" | ") + "---|",
        *(_format_row(row) for row in rows),
        "",
        "The last column is 1F1B's peak over (P/M) x GPipe's peak + one micro-batch, the largest over stages; "
        "at most 1 meets the bound.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="2,4", help="comma-separated pipeline stage counts")
    parser.add_argument("--micro-batches", default="1,2,4,8", help="comma-separated micro-batch counts")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--hidden", type=int, default=64, help="transformer width")
    parser.add_argument("--name", default="pipeline", help="results file name under bench/results/")
    args = parser.parse_args()
    args.stages = [int(v) for v in args.stages.split(",")]
    args.micro_batches = [int(v) for v in args.micro_batches.split(",")]

    print(HEADER, flush=True)
    rows = _rows(args)
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_markdown(rows, args))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
