"""Train an MLP on the digits data set with DiLoCo, through the Python API.

Run with, for example:

    mpiexec -n 2 python examples/diloco.py --period 16

Each rank takes ``--period`` AdamW steps on its own shard. The ranks then
average the pseudo-gradient (parameters at the start of the round minus the
current ones), and an outer Nesterov SGD step applies it.
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
    parser.add_argument("--period", type=int, default=16, help="inner steps per round")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    args = parser.parse_args(argv)

    ctx = hpcdl.init()
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("mlp", data, hidden=128)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spec = f"diloco:period={args.period},outer_lr={args.outer_lr},outer_momentum={args.outer_momentum}"
    model, optimizer = hpcdl.wrap(model, inner, strategy=spec)

    for epoch in range(args.epochs):
        for x, y in shard(data.x_train, data.y_train, batch_size=args.batch_size, rank=ctx.rank,
                          world_size=ctx.size, seed=0, epoch=epoch):
            optimizer.zero_grad()
            if len(x):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    hpcdl.finish(model, optimizer)
    _, accuracy = evaluate(model, data, ctx.comm)
    if ctx.rank == 0:
        print(f"diloco test accuracy {accuracy:.4f} comm_bytes {ctx.comm.bytes_sent}")
    return accuracy


if __name__ == "__main__":
    main()
