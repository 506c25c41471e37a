"""Alpha-beta cost model of communication, fitted to ``hpcdl bench allreduce`` results.

A message of m bytes costs alpha + m * beta seconds: alpha is the per-message
latency and beta the seconds per byte (1 / link bandwidth). A bandwidth-optimal
ring all-reduce over N ranks sends 2(N-1) messages of m/N bytes in sequence, so

    T_allreduce(m, N) = 2(N-1) * alpha + 2(N-1)/N * m * beta.

:func:`fit` recovers alpha and beta from measured (size, time) rows of one
rank count by least squares on the relative error, so small and large
messages weigh alike. :func:`project_step` then predicts each strategy's
communication per optimizer step on a cluster described by its own alpha,
beta and rank count. The results are projections from a model, not
measurements.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from hpcdl.errors import ConfigError


@dataclass
class AlphaBeta:
    """Fitted latency ``alpha_s`` (seconds per message) and ``beta_s_per_byte`` (seconds per byte)."""

    alpha_s: float
    beta_s_per_byte: float
    ranks: int
    algorithm: str

    @property
    def bandwidth_gbps(self) -> float:
        """Link bandwidth 1/beta in GB/s."""
        return 1.0 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else float("inf")

    def allreduce_s(self, size_bytes: float, ranks: int | None = None) -> float:
        """Return the modelled seconds of one ring all-reduce of ``size_bytes`` over ``ranks``."""
        n = ranks or self.ranks
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * size_bytes * self.beta_s_per_byte


def read_measurements(path: str | Path) -> list[dict]:
    """Read the CSV written by ``hpcdl bench allreduce`` into dicts with numeric fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"All-reduce results {str(path)!r} not found. Run 'hpcdl bench allreduce --out DIR' "
                          f"first, or pass its CSV with --csv.")
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({"algorithm": row["algorithm"], "size_bytes": int(row["size_bytes"]),
                         "ranks": int(row["ranks"]), "time_us": float(row["time_us"])})
    if not rows:
        raise ConfigError(f"All-reduce results {str(path)!r} contain no rows.")
    return rows


def fit(rows: list[dict], algorithm: str) -> AlphaBeta:
    """Fit alpha and beta to the ``algorithm`` rows of one rank count.

    Minimises the sum of squared relative errors of T = A + B * m, then maps
    A = 2(N-1) alpha and B = 2(N-1)/N beta.
    """
    selected = [r for r in rows if r["algorithm"] == algorithm]
    if len(selected) < 2:
        raise ConfigError(f"Cannot fit the cost model: fewer than 2 measurements of algorithm {algorithm!r}. "
                          f"Measure at least two sizes with 'hpcdl bench allreduce --algorithms {algorithm}'.")
    ranks = selected[0]["ranks"]
    if ranks < 2:
        raise ConfigError("Cannot fit the cost model to a 1-rank measurement: run 'hpcdl bench allreduce' "
                          "with -n 2 or more.")
    # Weighted least squares with weight 1/t: minimise sum(((A + B m) / t - 1)^2).
    s_aa = s_ab = s_bb = s_a = s_b = 0.0
    for row in selected:
        t = row["time_us"] * 1e-6
        u, v = 1.0 / t, row["size_bytes"] / t
        s_aa += u * u
        s_ab += u * v
        s_bb += v * v
        s_a += u
        s_b += v
    determinant = s_aa * s_bb - s_ab * s_ab
    if determinant <= 0:
        raise ConfigError(f"Cannot fit the cost model: the {algorithm!r} measurements need at least two "
                          f"different sizes.")
    intercept = (s_a * s_bb - s_b * s_ab) / determinant
    slope = (s_aa * s_b - s_ab * s_a) / determinant
    alpha = max(intercept, 0.0) / (2 * (ranks - 1))
    beta = max(slope, 0.0) / (2 * (ranks - 1) / ranks)
    return AlphaBeta(alpha, beta, ranks, algorithm)


def fit_errors(model: AlphaBeta, rows: list[dict]) -> list[tuple[int, float, float]]:
    """Return (size_bytes, measured_s, modelled_s) for each row of the fitted algorithm."""
    return [(r["size_bytes"], r["time_us"] * 1e-6, model.allreduce_s(r["size_bytes"]))
            for r in rows if r["algorithm"] == model.algorithm]


def strategy_comm_s(strategy: str, model: AlphaBeta, gradient_bytes: float, ranks: int,
                    ps_ranks: int = 1) -> float:
    """Return the modelled communication seconds per optimizer step of ``strategy``.

    - ``allreduce``: one ring all-reduce of the gradient per step.
    - ``local-sgd``, ``diloco``, ``hierarchical`` with ``period=H``: one all-reduce of the
      parameters every H steps (the intra-node part of ``hierarchical`` is taken as free).
    - ``async``, ``ssp``, ``bsp-ps``: each worker pushes a gradient and pulls the
      parameters; the ``ps_ranks`` server links carry all workers' traffic.
    - ``hogwild``: each rank sends its update of the other nodes' slices and reads
      them back once per step, taken as the whole parameter vector each way.
    """
    from hpcdl.strategies import parse_strategy

    spec = parse_strategy(strategy)
    name = spec.name
    period = int(spec.params.get("period", 1))
    if name == "allreduce":
        return model.allreduce_s(gradient_bytes, ranks)
    if name in ("local-sgd", "diloco", "hierarchical"):
        return model.allreduce_s(gradient_bytes, ranks) / max(period, 1)
    if name in ("async", "ssp", "bsp-ps"):
        workers = max(ranks - ps_ranks, 1)
        return 2 * model.alpha_s + 2 * workers * gradient_bytes * model.beta_s_per_byte / max(ps_ranks, 1)
    if name == "hogwild":
        return 2 * model.alpha_s + 2 * gradient_bytes * model.beta_s_per_byte
    raise ConfigError(f"The cost model has no formula for strategy {name!r}.")


def project(model: AlphaBeta, strategies: list[str], gradient_bytes: float, ranks: int, compute_s: float,
            alpha_s: float | None = None, rate_bits: float | None = None) -> list[dict]:
    """Project step time per strategy to a cluster of ``ranks`` with the given link.

    ``alpha_s`` and ``rate_bits`` override the fitted latency and bandwidth; left
    as None they keep the fitted values, which reproduces the measured machine.
    """
    target = AlphaBeta(alpha_s if alpha_s is not None else model.alpha_s,
                       8.0 / rate_bits if rate_bits else model.beta_s_per_byte, ranks, model.algorithm)
    rows = []
    for strategy in strategies:
        comm_s = strategy_comm_s(strategy, target, gradient_bytes, ranks)
        rows.append({"strategy": strategy, "comm_ms": comm_s * 1e3, "compute_ms": compute_s * 1e3,
                     "step_ms": (comm_s + compute_s) * 1e3})
    base = next((r["step_ms"] for r in rows if r["strategy"] == "allreduce"), None)
    for row in rows:
        row["vs_allreduce"] = row["step_ms"] / base if base else None
    return rows


def format_projection(model: AlphaBeta, rows: list[dict], ranks: int, link: str, latency: str) -> str:
    """Format the projection as Markdown, labelled as a projection with the fitted parameters."""
    lines = [f"Projection (alpha-beta model, not a measurement) to {ranks} ranks, link {link}, "
             f"latency {latency}.",
             f"Fitted on {model.ranks} ranks, algorithm {model.algorithm}: alpha = {model.alpha_s * 1e6:.2f} us, "
             f"beta = {model.beta_s_per_byte * 1e9:.4f} ns/B ({model.bandwidth_gbps:.3f} GB/s).",
             "",
             "| strategy | comm_ms | compute_ms | step_ms | vs allreduce |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        ratio = f"{row['vs_allreduce']:.3f}" if row["vs_allreduce"] is not None else "-"
        lines.append(f"| {row['strategy']} | {row['comm_ms']:.3f} | {row['compute_ms']:.3f} | "
                     f"{row['step_ms']:.3f} | {ratio} |")
    return "\n".join(lines)


_TIME_SCALE = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_latency(text: str) -> float:
    """Parse ``1us``, ``5ms`` or ``200ns`` into seconds."""
    import re

    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)\s*$", text or "")
    if not match:
        raise ConfigError(f"Invalid latency {text!r}: expected a number and a unit of ns, us, ms or s, "
                          f"for example 1us.")
    return float(match.group(1)) * _TIME_SCALE[match.group(2)]
