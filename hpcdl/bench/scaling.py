"""``hpcdl bench scaling``: training throughput and scaling efficiency by rank count.

Weak scaling keeps the per-rank batch fixed. Strong scaling keeps the global
batch fixed (``--batch-size`` at the smallest rank count, times that count),
so each rank's batch shrinks as ranks are added. Efficiency at N ranks is
(throughput_N / N) / (throughput_N0 / N0) for the smallest count N0.
"""

from __future__ import annotations

import csv
from pathlib import Path

from hpcdl.bench import runner
from hpcdl.bench.emulate import EmulatedLinks
from hpcdl.bench.plots import line_plot
from hpcdl.errors import ConfigError


def parse_rank_counts(text: str) -> list[int]:
    """Parse ``1,2,4`` into a sorted list of distinct positive rank counts."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ConfigError(f"Invalid -n {text!r}: expected positive rank counts separated by commas, e.g. 1,2,4.")
    return counts


def per_rank_batch(batch_size: int, counts: list[int], ranks: int, weak: bool) -> int:
    """Return the per-rank batch at ``ranks`` for weak or strong scaling."""
    if weak:
        return batch_size
    global_batch = batch_size * counts[0]
    if global_batch % ranks:
        raise ConfigError(f"Strong scaling needs the global batch {global_batch} (--batch-size {batch_size} x "
                          f"{counts[0]} ranks) to divide evenly by {ranks} ranks. Pick another --batch-size.")
    return global_batch // ranks


def run_scaling(counts: list[int], weak: bool, batch_size: int, flags: list[str], out_dir: Path,
                links_for=None, progress=None) -> list[dict]:
    """Train at each rank count and return rows with throughput and efficiency.

    ``links_for(ranks)`` returns a context manager of emulated links, or None for plain runs.
    """
    rows = []
    for ranks in counts:
        batch = per_rank_batch(batch_size, counts, ranks, weak)
        run_flags = [*flags, "--batch-size", str(batch)]
        run_dir = out_dir / "runs" / f"n{ranks}"
        if links_for is None:
            summary, _ = runner.train(ranks, run_flags, run_dir)
        else:
            with links_for(ranks) as links:
                summary, _ = runner.train(ranks, run_flags, run_dir, links=links)
        rows.append({"ranks": ranks, "per_rank_batch": batch, "samples_per_s": summary["samples_per_s"],
                     "comm_bytes_per_step": summary.get("comm_bytes_per_step", 0)})
        if progress is not None:
            progress(f"{ranks} ranks: {summary['samples_per_s']:.0f} samples/s")
    base = rows[0]["samples_per_s"] / rows[0]["ranks"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        row["efficiency"] = (row["samples_per_s"] / row["ranks"]) / base if base else 0.0
    return rows


def write_outputs(rows: list[dict], out_dir: Path, weak: bool) -> tuple[Path, Path, Path]:
    """Write scaling.csv, scaling.png and scaling.md; return their paths."""
    csv_path = out_dir / "scaling.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    kind = "weak" if weak else "strong"
    png_path = line_plot(out_dir / "scaling.png",
                         {"measured": ([r["ranks"] for r in rows], [r["efficiency"] for r in rows]),
                          "ideal": ([r["ranks"] for r in rows], [1.0] * len(rows))},
                         xlabel="ranks", ylabel="scaling efficiency", title=f"{kind.capitalize()} scaling")
    md_path = out_dir / "scaling.md"
    md_path.write_text(format_table(rows, kind) + "\n")
    return csv_path, png_path, md_path


def format_table(rows: list[dict], kind: str) -> str:
    """Format the rows as a Markdown table."""
    lines = [f"| ranks ({kind}) | per-rank batch | samples/s | speedup | efficiency |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['ranks']} | {row['per_rank_batch']} | {row['samples_per_s']:.0f} | "
                     f"{row['speedup']:.2f} | {row['efficiency']:.3f} |")
    return "\n".join(lines)
