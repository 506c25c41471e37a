"""Train an MLP on the digits data set with local SGD, through the Python API.

Run with, for example:

    mpiexec -n 2 python examples/local_sgd.py --period 8 --warmup 20

Each rank takes SGD steps on its own shard and the ranks average parameters
and buffers every ``--period`` steps, after ``--warmup`` synchronous steps.
"""

from __future__ import annotations

import argparse

import torch

import hpcdl
from hpcdl.data import load_dataset, shard
from hpcdl.evaluate import evaluate
from hpcdl.models import build_model


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--period", type=int, default=8, help="optimizer steps between averaging rounds")
    parser.add_argument("--warmup", type=int, default=12, help="synchronous all-reduce steps at the start")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    args = parser.parse_args(argv)

    ctx = hpcdl.init()
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("mlp", data, hidden=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = hpcdl.wrap(model, optimizer, strategy=f"local-sgd:period={args.period},warmup={args.warmup}")

    for epoch in range(args.epochs):
        for x, y in shard(data.x_train, data.y_train, batch_size=args.batch_size, rank=ctx.rank,
                          world_size=ctx.size, seed=0, epoch=epoch):
            optimizer.zero_grad()
            optimizer.set_sample_count(len(x))
            if len(x):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    hpcdl.finish(model, optimizer)
    _, accuracy = evaluate(model, data, ctx.comm)
    if ctx.rank == 0:
        print(f"local-sgd test accuracy {accuracy:.4f} comm_bytes {ctx.comm.bytes_sent}")
    return accuracy


if __name__ == "__main__":
    main()
