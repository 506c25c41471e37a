"""Headline measurement: time to allreduce's accuracy, and throughput kept under a straggler.

Setting: 4 ranks, each behind an emulated 100 Mbit link (network namespaces and
tbf, so it needs root), an MLP of about 2M parameters (hidden width 1024) on
mnist5k, one seed for every run.

Table 1 gives the wall time to reach the final test accuracy of plain
``allreduce``, for each strategy without compression and for ``allreduce``
with each compressor. It also gives ``allreduce``'s time divided by that time,
the speed-up, whose target is at least 3 for the best variant. Table 2 gives the samples/s kept when rank
1 computes 4x slower, as a ratio to the run without the straggler (the target
is at least 0.7 for ``async`` and ``ssp``). With ``async`` and ``ssp`` rank 0
serves parameters and the straggler's index counts workers, so the slow rank
is worker 1 of 3.

Usage (as root, on a quiet machine):
    .venv/bin/python bench/headline.py [--epochs 5] [--link 100mbit] [--quick]

It prints both tables and writes them to ``bench/results/headline.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpcdl.bench.compare import VariantResult, run_compare  # noqa: E402
from hpcdl.bench.emulate import EmulatedLinks  # noqa: E402

STRATEGIES = ["allreduce", "local-sgd:period=16", "diloco:period=64", "async", "ssp:staleness=2"]
COMPRESSORS = ["fp16", "topk:ratio=0.01", "powersgd:rank=4"]
STRAGGLER_STRATEGIES = ["allreduce", "local-sgd:period=16", "async", "ssp:staleness=2"]


def _time_table(results: list[VariantResult]) -> list[str]:
    base = results[0]
    target = base.final_accuracy or 0.0
    base_time = base.time_to_accuracy(target)
    lines = [f"Target: test accuracy {target:.4f}, the final accuracy of allreduce.", "",
             "| variant | final accuracy | time to target (s) | speed-up vs allreduce | comm_bytes vs allreduce |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for result in results:
        seconds = result.time_to_accuracy(target)
        speedup = f"{base_time / seconds:.2f}" if seconds and base_time else "not reached"
        time_text = f"{seconds:.1f}" if seconds is not None else "not reached"
        bytes_ratio = result.comm_bytes / base.comm_bytes if base.comm_bytes else 0.0
        lines.append(f"| {result.name} | {result.final_accuracy:.4f} | {time_text} | {speedup} | "
                     f"{bytes_ratio:.4f} |")
    return lines


def _straggler_table(plain: list[VariantResult], slowed: list[VariantResult]) -> list[str]:
    lines = ["| strategy | samples/s | samples/s with rank 1 at 4x compute | kept |",
             "| --- | ---: | ---: | ---: |"]
    for normal, straggling in zip(plain, slowed):
        kept = straggling.samples_per_s / normal.samples_per_s
        lines.append(f"| {normal.strategy} | {normal.samples_per_s:.0f} | {straggling.samples_per_s:.0f} | "
                     f"{kept:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--link", default="100mbit")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: digits, hidden 64, 1 epoch, fewer variants; the figures mean nothing")
    parser.add_argument("--name", default="headline")
    args = parser.parse_args()

    results_path = ROOT / "bench" / "results" / f"{args.name}.md"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        text = (f"# Headline: strategies at an emulated {args.link}\n\nNot measured: the emulated links need "
                f"root. Run `sudo .venv/bin/python bench/headline.py`.\n")
        results_path.write_text(text)
        print(text)
        return

    dataset, hidden, epochs = ("digits", 64, 1) if args.quick else ("mnist5k", 1024, args.epochs)
    flags = ["--dataset", dataset, "--model", "mlp", "--hidden", str(hidden), "--epochs", str(epochs),
             "--seed", "0", "--log-every", "5"]
    strategies, compressors, straggler_strategies = STRATEGIES, COMPRESSORS, STRAGGLER_STRATEGIES
    if args.quick:
        strategies, compressors, straggler_strategies = STRATEGIES[::3], COMPRESSORS[:1], ["allreduce", "async"]
    variants = [(s, "none") for s in strategies] + [("allreduce", c) for c in compressors]
    with tempfile.TemporaryDirectory() as scratch, EmulatedLinks(args.ranks, args.link) as links:
        out = Path(scratch)
        results = run_compare(None, args.ranks, variants, out / "time", extra_flags=flags, links=links,
                              progress=print)
        straggler_variants = [(s, "none") for s in straggler_strategies]
        plain = [r for r in results if r.compression == "none" and r.strategy in straggler_strategies]
        slowed = run_compare(None, args.ranks, straggler_variants, out / "straggler",
                             extra_flags=[*flags, "--straggler", "1:4"], links=links, progress=print)

    command = f".venv/bin/python bench/headline.py --epochs {args.epochs} --link {args.link}" + \
        (" --quick" if args.quick else "")
    lines = [f"# Headline: strategies at an emulated {args.link}", "",
             f"{args.ranks} ranks, each in its own network namespace behind a {args.link} tbf link; "
             f"mlp (hidden {hidden}) on {dataset}, {epochs} epochs, seed 0. Command: `{command}`.", "",
             "## Wall time to allreduce's accuracy", "", *_time_table(results), "",
             "## Throughput under a 4x straggler", "", *_straggler_table(plain, slowed), ""]
    results_path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
