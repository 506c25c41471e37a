"""Train an MLP on the digits data set with the hierarchical strategy, through the Python API.

Run with, for example:

    mpiexec -n 4 python examples/hierarchical.py --period 4 --ranks-per-node 2

Gradients are averaged inside each node every step and the model across
nodes every ``--period`` steps. ``--ranks-per-node`` groups consecutive ranks
into emulated nodes on one machine; the default, 0, takes nodes from MPI.
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
    parser.add_argument("--period", type=int, default=4, help="optimizer steps between rounds across nodes")
    parser.add_argument("--ranks-per-node", type=int, default=0, help="ranks per emulated node; 0 asks MPI")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    args = parser.parse_args(argv)

    ctx = hpcdl.init(ranks_per_node=args.ranks_per_node)
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model("mlp", data, hidden=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = hpcdl.wrap(model, optimizer, strategy=f"hierarchical:period={args.period}")

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
        print(f"hierarchical test accuracy {accuracy:.4f} comm_bytes {ctx.comm.bytes_sent}")
    return accuracy


if __name__ == "__main__":
    main()
