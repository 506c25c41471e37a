"""The ``hpcdl bench allreduce|scaling|project`` and ``hpcdl compare`` commands."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from hpcdl.errors import ConfigError

_EMULATE_HELP = ("Run each rank in its own network namespace behind a veth link limited to RATE by tbf, "
                 "e.g. 1gbit or 100mbit. Needs root.")
_STRAGGLER_HELP = ("Fault injection: slow rank RANK's compute FACTOR times (RANK:FACTOR, e.g. 1:4), for "
                   "load-imbalance studies.")
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


class BenchUsageFailure(click.ClickException):
    """Bad benchmark input: one paragraph, exit status 2."""

    exit_code = 2


def _default_out(name: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-bench-{name}"


def _links(ranks: int, rate: str | None):
    """Return a context manager with emulated links for ``ranks``, or a null one without a rate."""
    from hpcdl.bench.emulate import EmulatedLinks

    return EmulatedLinks(ranks, rate) if rate else contextlib.nullcontext(None)


def _check_emulation(rate: str | None) -> None:
    if rate:
        from hpcdl.bench.emulate import check_privileges, parse_rate

        parse_rate(rate)
        check_privileges()


@click.group()
def bench() -> None:
    """Benchmarks: all-reduce bandwidth, scaling efficiency, cost-model projection."""


@bench.command("allreduce")
@click.option("-n", "--ranks", type=int, default=2, show_default=True, help="Ranks to start.")
@click.option("--algorithms", default="ring,mpi", show_default=True,
              help="Comma list of ring, mpi, hierarchical, horovod.")
@click.option("--sizes", default="4B:64MB", show_default=True,
              help="Message sizes: MIN:MAX in 4x steps, or a comma list such as 1MB,16MB.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. [runs/<timestamp>-bench-allreduce]")
@click.option("--emulate-link", "emulate_link", metavar="RATE", help=_EMULATE_HELP)
def allreduce_command(ranks: int, algorithms: str, sizes: str, out: str | None, emulate_link: str | None) -> None:
    """Measure all-reduce time, algorithm and bus bandwidth by message size.

    Prints an OSU-style table with each algorithm's bus bandwidth as a ratio to
    MPI_Allreduce, and writes allreduce.csv, allreduce.png and allreduce.md.
    """
    from hpcdl.bench import allreduce
    from hpcdl.bench.emulate import mpi_environment
    from hpcdl.launch import find_mpiexec

    try:
        if ranks < 1:
            raise ConfigError(f"Invalid -n {ranks}: a job needs at least 1 rank.")
        try:
            allreduce.parse_sizes(sizes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        known = {"ring", "mpi", "hierarchical", "horovod"}
        unknown = [a for a in algorithms.split(",") if a not in known]
        if unknown:
            raise ConfigError(f"Unknown algorithm {unknown[0]!r} in --algorithms: use {', '.join(sorted(known))}.")
        _check_emulation(emulate_link)
        mpiexec = find_mpiexec()
    except ConfigError as exc:
        raise BenchUsageFailure(str(exc)) from None

    out_dir = Path(out) if out else _default_out("allreduce")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "allreduce.csv"
    job = [sys.executable, "-m", "hpcdl.bench.allreduce", "--algorithms", algorithms, "--sizes", sizes,
           "--csv", str(csv_path)]
    with _links(ranks, emulate_link) as links:
        env = dict(os.environ)
        if links is None:
            command = [mpiexec, "-n", str(ranks), *job]
        else:
            env.update(mpi_environment(ranks=ranks))
            command = links.mpiexec_command(mpiexec, ranks, job)
        status = subprocess.run(command, env=env).returncode
    if status != 0:
        raise click.ClickException(f"The all-reduce benchmark failed with exit status {status}.")
    write_allreduce_outputs(csv_path, out_dir, emulate_link)
    click.echo(f"wrote {csv_path}, {out_dir / 'allreduce.png'} and {out_dir / 'allreduce.md'}")


def write_allreduce_outputs(csv_path: Path, out_dir: Path, link: str | None) -> None:
    """Write the PNG plot of bus bandwidth and the Markdown table from the benchmark's CSV."""
    import csv

    from hpcdl.bench.allreduce import Measurement, format_table
    from hpcdl.bench.plots import line_plot

    with csv_path.open(newline="") as handle:
        rows = [Measurement(r["algorithm"], int(r["size_bytes"]), int(r["ranks"]), float(r["time_us"]),
                            float(r["algbw_gbps"]), float(r["busbw_gbps"])) for r in csv.DictReader(handle)]
    series: dict = {}
    for row in rows:
        xs, ys = series.setdefault(row.algorithm, ([], []))
        xs.append(row.size_bytes)
        ys.append(row.busbw_gbps)
    line_plot(out_dir / "allreduce.png", series, xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
              title=f"All-reduce bus bandwidth, {rows[0].ranks} ranks" + (f", link {link}" if link else ""),
              logx=True, logy=True)
    reference = "mpi" if any(r.algorithm == "mpi" for r in rows) else rows[0].algorithm
    (out_dir / "allreduce.md").write_text("```\n" + format_table(rows, reference) + "\n```\n")


@bench.command("scaling", context_settings=_PASS_THROUGH)
@click.option("-n", "--ranks", "rank_counts", default="1,2,4", show_default=True, help="Rank counts, e.g. 1,2,4.")
@click.option("--weak/--strong", default=True, show_default=True,
              help="Weak: fixed per-rank batch. Strong: fixed global batch.")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Per-rank batch at the smallest rank count.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. [runs/<timestamp>-bench-scaling]")
@click.option("--emulate-link", "emulate_link", metavar="RATE", help=_EMULATE_HELP)
@click.option("--straggler", metavar="RANK:FACTOR", help=_STRAGGLER_HELP)
@click.pass_context
def scaling_command(ctx: click.Context, rank_counts: str, weak: bool, batch_size: int, out: str | None,
                    emulate_link: str | None, straggler: str | None) -> None:
    """Measure training throughput at each rank count and its scaling efficiency.

    Other options (--model, --dataset, --steps, ...) go to 'hpcdl train'.
    Writes scaling.csv, scaling.png and scaling.md.
    """
    from hpcdl.bench import scaling

    flags = list(ctx.args) + (["--straggler", straggler] if straggler else [])
    try:
        counts = scaling.parse_rank_counts(rank_counts)
        for ranks in counts:
            scaling.per_rank_batch(batch_size, counts, ranks, weak)
        _check_emulation(emulate_link)
        out_dir = Path(out) if out else _default_out("scaling")
        out_dir.mkdir(parents=True, exist_ok=True)
        links_for = (lambda n: _links(n, emulate_link)) if emulate_link else None
        rows = scaling.run_scaling(counts, weak, batch_size, flags, out_dir, links_for=links_for,
                                   progress=click.echo)
    except ConfigError as exc:
        raise BenchUsageFailure(str(exc)) from None
    scaling.write_outputs(rows, out_dir, weak)
    click.echo(scaling.format_table(rows, "weak" if weak else "strong"))
    click.echo(f"wrote {out_dir / 'scaling.csv'}, {out_dir / 'scaling.png'} and {out_dir / 'scaling.md'}")


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    """Split a leading CONFIG.toml from the options passed through to 'hpcdl train'."""
    if args and not args[0].startswith("-"):
        if not Path(args[0]).is_file():
            raise BenchUsageFailure(f"Config file {args[0]!r} not found. Check the path.")
        return args[0], list(args[1:])
    return None, list(args)


@bench.command("project")
@click.option("--csv", "csv_path", required=True, type=click.Path(dir_okay=False),
              help="allreduce.csv written by 'hpcdl bench allreduce'.")
@click.option("--algorithm", default="mpi", show_default=True, help="Which measured algorithm to fit.")
@click.option("--link", help="Link rate of the projected cluster, e.g. 200gbit. [fitted bandwidth]")
@click.option("--latency", help="Per-message latency of the projected cluster, e.g. 1us. [fitted alpha]")
@click.option("-n", "--ranks", type=int, help="Ranks of the projected cluster. [the measured count]")
@click.option("--strategies", default="allreduce; local-sgd:period=16; diloco:period=64; async; ssp:staleness=2",
              show_default=True, help="Strategy specs separated by ';'.")
@click.option("--params", type=int, default=2_000_000, show_default=True,
              help="Model parameters; each step's gradient is 4 bytes per parameter.")
@click.option("--compute-ms", type=float, default=0.0, show_default=True,
              help="Compute time per step in milliseconds, added to every strategy.")
def project_command(csv_path: str, algorithm: str, link: str | None, latency: str | None, ranks: int | None,
                    strategies: str, params: int, compute_ms: float) -> None:
    """Project step time per strategy to a described cluster with a fitted alpha-beta model.

    Prints how well the model reproduces the measurements it was fitted on,
    then the projection, labelled as such.
    """
    from hpcdl.bench import costmodel
    from hpcdl.bench.allreduce import human_size
    from hpcdl.bench.emulate import parse_rate

    try:
        rows = costmodel.read_measurements(csv_path)
        model = costmodel.fit(rows, algorithm)
        rate_bits = parse_rate(link) if link else None
        alpha_s = costmodel.parse_latency(latency) if latency else None
        strategy_list = [s.strip() for s in strategies.split(";") if s.strip()]
        target_ranks = ranks or model.ranks
        if target_ranks < 2:
            raise ConfigError(f"Invalid -n {target_ranks}: a projection needs at least 2 ranks.")
        projection = costmodel.project(model, strategy_list, params * 4, target_ranks, compute_ms / 1e3,
                                       alpha_s=alpha_s, rate_bits=rate_bits)
    except ConfigError as exc:
        raise BenchUsageFailure(str(exc)) from None

    click.echo(f"Fit of {algorithm} on {model.ranks} ranks (measured against modelled):")
    for size, measured, modelled in costmodel.fit_errors(model, rows):
        click.echo(f"  {human_size(size):>8} measured {measured * 1e6:12.1f} us  model {modelled * 1e6:12.1f} us  "
                   f"error {100 * (modelled - measured) / measured:+6.1f}%")
    click.echo("")
    click.echo(costmodel.format_projection(model, projection, target_ranks, link or "fitted",
                                           latency or "fitted"))


@click.command("compare", context_settings=_PASS_THROUGH)
@click.option("-n", "--ranks", type=int, default=2, show_default=True, help="Ranks for every variant.")
@click.option("--strategies", default="allreduce; local-sgd:period=16", show_default=True,
              help="Strategy specs separated by ';', e.g. \"allreduce; local-sgd:period=16; async\".")
@click.option("--compression", "compressions", help="Compression specs separated by ';'; each is tried with "
              "every strategy. [none]")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Runs per variant; times are the median over runs.")
@click.option("--target-accuracy", type=float,
              help="Accuracy for the time-to-target column. [95% of the best final accuracy]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed shared by every variant.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. [runs/<timestamp>-bench-compare]")
@click.option("--emulate-link", "emulate_link", metavar="RATE", help=_EMULATE_HELP)
@click.option("--straggler", metavar="RANK:FACTOR", help=_STRAGGLER_HELP)
@click.pass_context
def compare(ctx: click.Context, ranks: int, strategies: str, compressions: str | None,
            repeat: int, target_accuracy: float | None, seed: int, out: str | None, emulate_link: str | None,
            straggler: str | None) -> None:
    """Run strategies and compressors side by side and write report.md with plots.

    Usage: hpcdl compare [CONFIG.toml] [OPTIONS] [TRAIN OPTIONS]. Every variant uses the same CONFIG.toml, seed, data, model and rank count;
    other options (--model, --dataset, --epochs, ...) go to 'hpcdl train'.

    \b
    Example:
      hpcdl compare -n 4 --dataset digits --epochs 3 \\
          --strategies "allreduce; local-sgd:period=16; diloco:period=64; async; ssp:staleness=2"
    """
    from hpcdl.bench import compare as compare_module

    config_file, train_args = _split_config(ctx.args)
    flags = [*train_args, "--seed", str(seed)] + (["--straggler", straggler] if straggler else [])
    try:
        if repeat < 1:
            raise ConfigError(f"Invalid --repeat {repeat}: it must be at least 1.")
        if ranks < 1:
            raise ConfigError(f"Invalid -n {ranks}: a job needs at least 1 rank.")
        variants = compare_module.parse_variants(strategies, compressions)
        _check_emulation(emulate_link)
        out_dir = Path(out) if out else _default_out("compare")
        out_dir.mkdir(parents=True, exist_ok=True)
        with _links(ranks, emulate_link) as links:
            results = compare_module.run_compare(config_file, ranks, variants, out_dir, repeat=repeat,
                                                 extra_flags=flags, links=links, progress=click.echo)
        target = target_accuracy if target_accuracy is not None else compare_module.default_target(results)
    except ConfigError as exc:
        raise BenchUsageFailure(str(exc)) from None

    header = (f"{ranks} ranks, seed {seed}, link {emulate_link or 'not emulated'}"
              + (f", straggler {straggler}" if straggler else "")
              + f", {repeat} run(s) per variant; train flags: {' '.join(train_args) or '(defaults)'}"
              + (f"; config {config_file}" if config_file else "") + ".")
    compare_module.write_plots(results, out_dir)
    report = compare_module.write_report(results, target, out_dir, header)
    click.echo(compare_module.report_table(results, target))
    click.echo(f"wrote {report}")
