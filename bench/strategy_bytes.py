"""Bytes on the wire and test accuracy of allreduce, local SGD and DiLoCo.

For each strategy the script runs ``hpcdl train -n RANKS`` on the same data,
model and seed, and reads ``summary.json``. Each row gives
``comm_bytes_per_step`` (bytes all ranks sent, divided by optimizer steps),
its ratio to ``allreduce``'s, the final test accuracy and its difference
from ``allreduce``'s in percentage points. The script then checks the target
for ``local-sgd`` with H=16: at most 1/12 of ``allreduce``'s bytes, and test
accuracy within 1 point of it.

DiLoCo runs with AdamW as its inner optimizer (``--diloco-lr``), the other
strategies with the run's SGD settings.

Usage:
    .venv/bin/python bench/strategy_bytes.py [--ranks 4] [--dataset mnist5k] [--epochs 10]
        [--periods 4,16,64] [--diloco-period 64] [--name local_sgd]

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


def _run(strategy: str, extra: list[str], args: argparse.Namespace, scratch: Path) -> dict:
    run_dir = scratch / strategy.replace(":", "_").replace(",", "_").replace("=", "")
    command = [HPCDL, "train", "-n", str(args.ranks), "--strategy", strategy, "--dataset", args.dataset,
               "--model", args.model, "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--progress", "off", "--run-dir", str(run_dir), *extra]
    command += ["--steps", str(args.steps)] if args.steps else ["--epochs", str(args.epochs)]
    env = dict(os.environ, HPCDL_LOG_LEVEL="WARNING")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["command"] = " ".join(command[1:])
    return summary


def _strategies(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    runs = [("allreduce", [])]
    runs += [(f"local-sgd:period={period}", []) for period in args.periods]
    runs.append((f"diloco:period={args.diloco_period}", ["--optimizer", "adamw", "--lr", str(args.diloco_lr)]))
    return runs


def _table(rows: list[dict]) -> list[str]:
    base = rows[0]
    lines = ["| strategy | comm_bytes_per_step | ratio to allreduce | test_accuracy | points vs allreduce |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        ratio = row["comm_bytes_per_step"] / base["comm_bytes_per_step"]
        points = 100 * (row["test_accuracy"] - base["test_accuracy"])
        lines.append(f"| `{row['strategy']}` | {row['comm_bytes_per_step']:.0f} | {ratio:.4f} (1/{1 / ratio:.1f}) "
                     f"| {row['test_accuracy']:.4f} | {points:+.2f} |")
    return lines


def _target(rows: list[dict]) -> str:
    base = rows[0]
    target = next((row for row in rows if row["strategy"] == "local-sgd:period=16"), None)
    if target is None:
        return "Target not checked: the sweep has no local-sgd:period=16 run."
    ratio = target["comm_bytes_per_step"] / base["comm_bytes_per_step"]
    points = 100 * (target["test_accuracy"] - base["test_accuracy"])
    verdict = "met" if ratio <= 1 / 12 and points >= -1.0 else "NOT met"
    return (f"Target (local-sgd H=16 sends at most 1/12 of allreduce's bytes, accuracy within 1 point): "
            f"{verdict}; ratio 1/{1 / ratio:.1f}, {points:+.2f} points.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of --epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--periods", type=lambda text: [int(p) for p in text.split(",")], default=[4, 16, 64])
    parser.add_argument("--diloco-period", type=int, default=64)
    parser.add_argument("--diloco-lr", type=float, default=1e-3, help="AdamW learning rate of DiLoCo's inner steps")
    parser.add_argument("--name", default="local_sgd")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hpcdl-bench-strategy-") as scratch:
        rows = [_run(strategy, extra, args, Path(scratch)) for strategy, extra in _strategies(args)]

    length = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    lines = [f"## Strategy bytes and accuracy: {args.dataset}, {args.model}, {args.ranks} ranks, {length}", "",
             f"Command: `.venv/bin/python bench/strategy_bytes.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}", "", *_table(rows), "", _target(rows), ""]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
