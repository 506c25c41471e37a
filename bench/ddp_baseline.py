"""A plain torch.distributed DDP training loop, the peer hpcdl's allreduce is measured against.

Started by bench/allreduce_vs_ddp.py under mpiexec; MPI only supplies the rank,
the world size and a rendezvous port, and the gradients travel through DDP's own
gloo all-reduce. The model, batches, optimizer and thread count match
``hpcdl train --dataset mnist5k --model mlp --hidden H``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
from mpi4py import MPI

from hpcdl.data import GlobalBatchSampler, load_dataset
from hpcdl.models import build_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // node_size))
    port = comm.bcast(_free_port() if rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)

    data = load_dataset("mnist5k")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model("mlp", data, hidden=args.hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = GlobalBatchSampler(len(data.x_train), args.batch_size, rank, size, seed=0)

    steps_per_epoch = sampler.steps_per_epoch()
    samples = 0
    dist.barrier()
    start = time.perf_counter()
    for step in range(args.steps):
        epoch, index = divmod(step, steps_per_epoch)
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        loss.backward()
        optimizer.step()
        samples += sampler.samples_in_step(index)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        with open(args.output, "w") as handle:
            json.dump({"samples_per_s": samples / elapsed, "wall_time_s": elapsed, "steps": args.steps}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
