"""All-reduce bus bandwidth by message size, in the style of the OSU micro-benchmarks.

Run inside an MPI job; rank 0 prints a table and writes CSV:

    mpiexec -n 4 python -m hpcdl.bench.allreduce --algorithms ring,mpi --csv out.csv

Bus bandwidth is the algorithm bandwidth (bytes / time) times 2(N-1)/N, the
fraction of the buffer each rank must send in a bandwidth-optimal all-reduce, so
figures from different rank counts compare directly (the convention of
nccl-tests).
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass

import torch

from hpcdl.comm import Communicator

DEFAULT_SIZES = [4 << (2 * i) for i in range(13)]  # 4 B, 16 B, ..., 64 MiB


@dataclass
class Measurement:
    """One row of the benchmark: an algorithm at one message size."""

    algorithm: str
    size_bytes: int
    ranks: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float


def bus_bandwidth(size_bytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """Return (algorithm bandwidth, bus bandwidth) in GB/s for one all-reduce."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * 2 * (ranks - 1) / ranks


def _iterations(size_bytes: int) -> int:
    return max(5, min(200, (64 << 20) // max(size_bytes, 1) // 4))


def time_allreduce(comm: Communicator, algorithm: str, size_bytes: int, *, iterations: int | None = None,
                   warmup: int = 3) -> float:
    """Return the mean seconds per all-reduce of ``size_bytes`` float32 bytes, slowest rank."""
    numel = max(1, size_bytes // 4)
    tensor = torch.ones(numel)
    iterations = iterations or _iterations(size_bytes)
    for _ in range(warmup):
        comm.allreduce(tensor, algorithm=algorithm)
    comm.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        comm.allreduce(tensor, algorithm=algorithm)
    elapsed = (time.perf_counter() - start) / iterations
    return float(comm.allreduce_scalars([elapsed], op="max")[0])


def run(comm: Communicator, algorithms: list[str], sizes: list[int]) -> list[Measurement]:
    """Measure every algorithm at every size; every rank must call it."""
    rows = []
    for size in sizes:
        for algorithm in algorithms:
            seconds = time_allreduce(comm, algorithm, size)
            algbw, busbw = bus_bandwidth(max(4, size), seconds, comm.size)
            rows.append(Measurement(algorithm, size, comm.size, seconds * 1e6, algbw, busbw))
    return rows


def format_table(rows: list[Measurement], reference: str = "mpi") -> str:
    """Format rows as an OSU-style table with each algorithm's bus bandwidth ratio to ``reference``."""
    by_key = {(r.algorithm, r.size_bytes): r for r in rows}
    lines = [f"{'size':>10} {'algorithm':>12} {'time_us':>10} {'algbw_GB/s':>11} {'busbw_GB/s':>11} "
             f"{'vs ' + reference:>8}"]
    for row in rows:
        ref = by_key.get((reference, row.size_bytes))
        ratio = f"{row.busbw_gbps / ref.busbw_gbps:8.2f}" if ref else f"{'-':>8}"
        lines.append(f"{human_size(row.size_bytes):>10} {row.algorithm:>12} {row.time_us:10.1f} "
                     f"{row.algbw_gbps:11.3f} {row.busbw_gbps:11.3f} {ratio}")
    return "\n".join(lines)


def human_size(size: int) -> str:
    """Return ``size`` bytes as 4B, 16KB, 64MB."""
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size // scale}{unit}"
    return f"{size}B"


_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """Parse ``4B``, ``16KB``, ``256MB`` or a plain byte count (binary units, as human_size prints)."""
    import re

    match = re.match(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"Invalid size {text!r}: expected a byte count such as 4B, 16KB or 256MB.")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]


def parse_sizes(text: str) -> list[int]:
    """Parse ``MIN:MAX`` (every 4x step from MIN to MAX) or a comma list such as ``1MB,16MB``."""
    if ":" in text:
        low, high = (parse_size(part) for part in text.split(":", 1))
        if low < 4 or high < low:
            raise ValueError(f"Invalid size range {text!r}: expected MIN:MAX with 4B <= MIN <= MAX.")
        sizes = []
        size = low
        while size <= high:
            sizes.append(size)
            size *= 4
        return sizes
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 4:
        raise ValueError(f"Invalid sizes {text!r}: give sizes of at least 4B.")
    return sizes


def write_csv(rows: list[Measurement], path: str) -> None:
    """Write rows to a CSV file with a header."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def main() -> None:
    parser = argparse.ArgumentParser(description="All-reduce bus bandwidth by message size.")
    parser.add_argument("--algorithms", default="ring,mpi")
    parser.add_argument("--max-size", type=int, default=64 << 20, help="largest message in bytes")
    parser.add_argument("--sizes", help="MIN:MAX in 4x steps, or a comma list, e.g. 4B:256MB; overrides --max-size")
    parser.add_argument("--csv", help="write the measurements to this CSV file")
    args = parser.parse_args()

    comm = Communicator()
    sizes = [s for s in DEFAULT_SIZES if s <= args.max_size]
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    rows = run(comm, args.algorithms.split(","), sizes)
    if comm.rank == 0:
        print(format_table(rows), flush=True)
        if args.csv:
            write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
