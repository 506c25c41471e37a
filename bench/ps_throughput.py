"""Parameter-server throughput as a ratio to raw MPI point-to-point of the same bytes.

For each (workers, server ranks) pair the script starts one MPI job. In it,
every worker first runs push-pull and pull-only rounds against the shards, then
the same ranks exchange the same bytes with bare ``MPI_Isend``/``MPI_Irecv``
(a round trip per push-pull, a one-way reply per pull). Each row reports
rounds per second and their ratio to the bare exchange, so the ratio is
measured on the same machine in the same job.

Usage:
    .venv/bin/python bench/ps_throughput.py [--numel 1000000] [--rounds 50]
        [--workers 1,2,4] [--servers 1,2] [--name ps]

It prints the table and writes it to ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG_RAW = 7201


def _child(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    from hpcdl.api import init
    from hpcdl.ps.client import PSClient
    from hpcdl.ps.layout import create_layout
    from hpcdl.ps.protocol import shard_bounds
    from hpcdl.ps.server import ServerSettings, ShardServer

    ctx = init()
    layout = create_layout(ctx.comm, args.servers)
    comm = layout.comm
    bounds = shard_bounds(args.numel, args.servers)
    rounds = args.rounds
    workers = layout.worker_ranks

    if layout.is_server:
        shard = layout.server_ranks.index(comm.rank)
        ShardServer(comm, shard, workers, ServerSettings(mode="async", optimizer="sgd")).serve()
        start, end = bounds[shard]
        buffer = torch.empty(end - start, dtype=torch.float32)
        status = MPI.Status()
        # Echo for the round trips, then send one-way replies for the pull baseline.
        for _ in range(2 * rounds * len(workers)):
            comm.comm.Probe(MPI.ANY_SOURCE, TAG_RAW, status)
            source = status.Get_source()
            small = status.Get_count(MPI.BYTE) < 64
            if small:
                token = torch.empty(9, dtype=torch.float64)
                comm.recv(token, source=source, tag=TAG_RAW)
            else:
                comm.recv(buffer, source=source, tag=TAG_RAW)
            comm.send(buffer, source, tag=TAG_RAW + 1)
        return

    worker_comm = layout.worker_comm
    params = torch.randn(args.numel)
    grad = torch.full((args.numel,), 1e-6)
    client = PSClient(comm, layout.server_ranks, args.numel)
    if worker_comm.rank == 0:
        client.init(params)
    worker_comm.barrier()

    client.push_pull(grad, params, 1, lr=0.0)
    worker_comm.barrier()
    start = time.perf_counter()
    for clock in range(2, rounds + 2):
        client.push_pull(grad, params, clock, lr=0.0)
    push_pull_s = time.perf_counter() - start
    worker_comm.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        client.pull(params)
    pull_s = time.perf_counter() - start
    worker_comm.barrier()
    client.done()

    slices = [params[a:b] for a, b in bounds]
    replies = [torch.empty(b - a) for a, b in bounds]
    token = torch.zeros(9, dtype=torch.float64)

    def raw_round(one_way: bool) -> None:
        requests = []
        for server, send, reply in zip(layout.server_ranks, slices, replies):
            requests.append(comm.irecv(reply, source=server, tag=TAG_RAW + 1))
            requests.append(comm.isend(token if one_way else send, server, tag=TAG_RAW))
        MPI.Request.Waitall(requests)

    worker_comm.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        raw_round(one_way=False)
    raw_round_trip_s = time.perf_counter() - start
    worker_comm.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        raw_round(one_way=True)
    raw_one_way_s = time.perf_counter() - start

    totals = worker_comm.allreduce_scalars([push_pull_s, pull_s, raw_round_trip_s, raw_one_way_s], op="max")
    if worker_comm.rank == 0:
        push_pull_s, pull_s, raw_round_trip_s, raw_one_way_s = totals.tolist()
        n = len(workers) * rounds
        print(json.dumps({"workers": len(workers), "servers": args.servers, "numel": args.numel,
                          "message_bytes": 4 * (bounds[0][1] - bounds[0][0]),
                          "push_pull_per_s": n / push_pull_s, "pull_per_s": n / pull_s,
                          "raw_round_trip_per_s": n / raw_round_trip_s, "raw_one_way_per_s": n / raw_one_way_s}),
              flush=True)


def _run_job(args: argparse.Namespace, workers: int, servers: int) -> dict:
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    command = [mpiexec, "-n", str(workers + servers), sys.executable, __file__, "--child",
               "--servers", str(servers), "--numel", str(args.numel), "--rounds", str(args.rounds)]
    env = dict(os.environ, HPCDL_LOG_LEVEL="WARNING")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark job {workers} workers / {servers} servers failed:\n{result.stderr[-2000:]}")
    line = [text for text in result.stdout.splitlines() if text.startswith("{")][-1]
    return json.loads(line)


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Parameter-server throughput, {args.numel} float32 parameters, {args.rounds} rounds per worker.",
        f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
        f"Command: `.venv/bin/python bench/ps_throughput.py --numel {args.numel} --rounds {args.rounds} "
        f"--workers {args.workers} --servers {args.servers}`",
        "",
        "Rates are rounds per second summed over workers. A push-pull is compared with a bare round trip of "
        "the same bytes, a pull with a bare one-way reply.",
        "",
        "| workers | server ranks | message MB | push-pull/s | raw round trip/s | ratio | pull/s | raw one-way/s | ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['servers']} | {r['message_bytes'] / 1e6:.2f} | {r['push_pull_per_s']:.1f} | "
            f"{r['raw_round_trip_per_s']:.1f} | {r['push_pull_per_s'] / r['raw_round_trip_per_s']:.2f} | "
            f"{r['pull_per_s']:.1f} | {r['raw_one_way_per_s']:.1f} | "
            f"{r['pull_per_s'] / r['raw_one_way_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numel", type=int, default=1_000_000, help="float32 parameters. [1000000]")
    parser.add_argument("--rounds", type=int, default=50, help="timed rounds per worker. [50]")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts. [1,2,4]")
    parser.add_argument("--servers", default="1,2", help="comma-separated server-rank counts. [1,2]")
    parser.add_argument("--name", default="ps", help="writes bench/results/NAME.md. [ps]")
    parser.add_argument("--timeout-s", type=float, default=600, help="limit per MPI job in seconds. [600]")
    args = parser.parse_args()
    if args.child:
        args.servers = int(args.servers)
        _child(args)
        return

    rows = []
    for servers in (int(s) for s in args.servers.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            row = _run_job(args, workers, servers)
            rows.append(row)
            print(f"{workers} workers, {servers} server ranks: push-pull "
                  f"{row['push_pull_per_s'] / row['raw_round_trip_per_s']:.2f} of raw, pull "
                  f"{row['pull_per_s'] / row['raw_one_way_per_s']:.2f} of raw", flush=True)
    table = _table(rows, args)
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
