"""``hpcdl compare``: strategies and compressors side by side on one model, data set and seed.

Each variant (a strategy and a compressor) runs ``hpcdl train`` with the same
config, seed and rank count. The report gives, per variant, the final test
accuracy, the wall time to reach a target accuracy, samples/s, ``comm_bytes``
and its ratio to ``allreduce``, staleness where the strategy has any, and
under ``--emulate-link`` the bytes the kernel counted on the links.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from hpcdl.bench import runner
from hpcdl.bench.emulate import EmulatedLinks
from hpcdl.bench.plots import line_plot
from hpcdl.errors import ConfigError


@dataclass
class VariantResult:
    """Outputs of one variant's runs; the timing fields are medians over repeats."""

    strategy: str
    compression: str
    summaries: list[dict]
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.strategy if self.compression == "none" else f"{self.strategy} + {self.compression}"

    @property
    def final_accuracy(self) -> float | None:
        values = [s.get("test_accuracy") for s in self.summaries if s.get("test_accuracy") is not None]
        return statistics.median(values) if values else None

    @property
    def samples_per_s(self) -> float:
        return statistics.median(s["samples_per_s"] for s in self.summaries)

    @property
    def comm_bytes(self) -> int:
        return int(statistics.median(s["comm_bytes"] for s in self.summaries))

    @property
    def staleness(self) -> dict[str, float]:
        summary = self.summaries[0]
        return {k: v for k, v in summary.items() if k.startswith("staleness") and v is not None}

    @property
    def wire_bytes(self) -> int | None:
        """Bytes the kernel counted on the emulated links in the first run, or None without emulation."""
        return self.summaries[0].get("wire_bytes")

    def time_to_accuracy(self, target: float) -> float | None:
        """Return the wall seconds of the first logged evaluation at or above ``target``, or None."""
        for record in self.records:
            accuracy = record.get("test_accuracy")
            if accuracy is not None and accuracy >= target:
                return float(record["wall_time_s"])
        return None


def parse_variants(strategies: str, compressions: str | None) -> list[tuple[str, str]]:
    """Return every (strategy, compressor) pair from ``;``-separated spec lists."""
    strategy_list = [s.strip() for s in strategies.split(";") if s.strip()]
    compression_list = [c.strip() for c in (compressions or "none").split(";") if c.strip()] or ["none"]
    if not strategy_list:
        raise ConfigError("Invalid --strategies: give at least one strategy spec, e.g. \"allreduce; local-sgd\".")
    from hpcdl.compression import parse_compression
    from hpcdl.strategies import parse_strategy

    for spec in strategy_list:
        parse_strategy(spec)
    for spec in compression_list:
        parse_compression(spec)
    variants = []
    for strategy in strategy_list:
        for compression in compression_list:
            if (strategy, compression) not in variants:
                variants.append((strategy, compression))
    return variants


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def run_compare(config_file: str | None, ranks: int, variants: list[tuple[str, str]], out_dir: Path, *,
                repeat: int = 1, extra_flags: list[str] | None = None, links: EmulatedLinks | None = None,
                progress=None) -> list[VariantResult]:
    """Run every variant ``repeat`` times and return their results; the first repeat's metrics are kept."""
    results = []
    for strategy, compression in variants:
        summaries, records = [], []
        for index in range(repeat):
            run_dir = out_dir / "runs" / f"{_slug(strategy)}--{_slug(compression)}--{index}"
            flags = [*(extra_flags or []), "--strategy", strategy, "--compression", compression]
            summary, run_records = runner.train(ranks, flags, run_dir, links=links, config_file=config_file)
            summaries.append(summary)
            if index == 0:
                records = run_records
            if progress is not None:
                progress(f"{strategy} / {compression} run {index + 1}/{repeat}: "
                         f"accuracy {summary.get('test_accuracy')}, {summary['samples_per_s']:.0f} samples/s")
        results.append(VariantResult(strategy, compression, summaries, records))
    return results


def default_target(results: list[VariantResult]) -> float:
    """Return 95% of the best final accuracy among the variants."""
    accuracies = [r.final_accuracy for r in results if r.final_accuracy is not None]
    if not accuracies:
        raise ConfigError("No variant reported test_accuracy, so no target accuracy can be set: use a data set "
                          "with classes, or pass --target-accuracy.")
    return 0.95 * max(accuracies)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_table(results: list[VariantResult], target: float) -> str:
    """Format the per-variant table as Markdown; ratios are to the ``allreduce`` variant without compression."""
    base = next((r for r in results if r.strategy.split(":")[0] == "allreduce" and r.compression == "none"),
                results[0])
    base_time = base.time_to_accuracy(target)
    lines = [f"| variant | final accuracy | time to {target:.3f} (s) | vs {base.name} | samples/s | comm_bytes | "
             f"bytes vs {base.name} | staleness | wire_bytes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for result in results:
        seconds = result.time_to_accuracy(target)
        ratio = seconds / base_time if seconds is not None and base_time else None
        bytes_ratio = result.comm_bytes / base.comm_bytes if base.comm_bytes else None
        staleness = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in result.staleness.items()) or "-"
        lines.append(f"| {result.name} | {_fmt(result.final_accuracy, '.4f')} | {_fmt(seconds, '.2f')} | "
                     f"{_fmt(ratio, '.3f')} | {result.samples_per_s:.0f} | {result.comm_bytes} | "
                     f"{_fmt(bytes_ratio, '.4f')} | {staleness} | {result.wire_bytes or '-'} |")
    return "\n".join(lines)


def write_plots(results: list[VariantResult], out_dir: Path) -> list[Path]:
    """Write accuracy against wall time, accuracy against bytes sent, and loss against step."""
    def series(x_key: str, y_key: str) -> dict:
        out = {}
        for result in results:
            points = [(r[x_key], r[y_key]) for r in result.records
                      if r.get(y_key) is not None and r.get(x_key) is not None]
            if points:
                out[result.name] = ([p[0] for p in points], [p[1] for p in points])
        return out

    return [
        line_plot(out_dir / "accuracy_vs_time.png", series("wall_time_s", "test_accuracy"),
                  xlabel="wall time (s)", ylabel="test accuracy", title="Accuracy against wall time"),
        line_plot(out_dir / "accuracy_vs_bytes.png", series("comm_bytes", "test_accuracy"),
                  xlabel="bytes sent, all ranks", ylabel="test accuracy", title="Accuracy against bytes sent"),
        line_plot(out_dir / "loss_vs_step.png", series("step", "loss"),
                  xlabel="step", ylabel="training loss", title="Loss against step"),
    ]


def write_report(results: list[VariantResult], target: float, out_dir: Path, header: str) -> Path:
    """Write ``report.md`` with the table and links to the plots; return its path."""
    text = "\n".join([
        "# Strategy comparison", "", header, "",
        report_table(results, target), "",
        "![accuracy against wall time](accuracy_vs_time.png)",
        "![accuracy against bytes sent](accuracy_vs_bytes.png)",
        "![loss against step](loss_vs_step.png)", "",
    ])
    path = out_dir / "report.md"
    path.write_text(text)
    return path
