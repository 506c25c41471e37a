"""Train a small classifier with hpcdl's Python API inside your own loop.

Run it on 2 ranks:

    mpiexec -n 2 python examples/train_allreduce.py --epochs 5

Every rank loads the digits data set, takes its shard of each global batch,
and steps a wrapped optimizer that averages gradients by ring all-reduce.
"""

from __future__ import annotations

import argparse
import json

import torch

import hpcdl
from hpcdl.data import GlobalBatchSampler, load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--strategy", default="allreduce")
    parser.add_argument("--output", help="write the final metrics as JSON to this file (rank 0)")
    args = parser.parse_args()

    ctx = hpcdl.init()
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = hpcdl.wrap(model, optimizer, strategy=args.strategy)

    sampler = GlobalBatchSampler(len(data.x_train), args.batch_size, ctx.rank, ctx.size, seed=0)
    for epoch in range(args.epochs):
        for step in range(sampler.steps_per_epoch()):
            batch = sampler.indices(epoch, step)
            optimizer.zero_grad()
            # Weight each rank by its samples, so the short last batch averages correctly.
            optimizer.set_sample_count(len(batch), sampler.samples_in_step(step))
            if len(batch):
                loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                loss.backward()
            optimizer.step()

    hpcdl.finish(model, optimizer)

    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
        checksum = sum(float(p.double().sum()) for p in model.parameters())
    if ctx.rank == 0:
        print(f"test accuracy {accuracy:.4f} on {ctx.size} ranks")
    if args.output:
        # Every rank reports its parameter checksum, so a caller can see they agree.
        sums = ctx.comm.comm.gather(checksum, root=0)
        if ctx.rank == 0:
            with open(args.output, "w") as handle:
                json.dump({"test_accuracy": accuracy, "world_size": ctx.size, "checksums": sums}, handle)


if __name__ == "__main__":
    main()
