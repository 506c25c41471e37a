"""``allreduce`` on N ranks with batch B equals one process with batch N*B."""

from __future__ import annotations

import copy

import pytest
import torch

import hpcdl
from hpcdl.data import GlobalBatchSampler

pytestmark = pytest.mark.mpi(min_size=4)

NUM_SAMPLES = 150
STEPS = 12


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(NUM_SAMPLES, 10, generator=generator)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    return model, x, y


def _train_single_process(model, x, y, world_size: int, batch_size: int) -> torch.nn.Module:
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = GlobalBatchSampler(NUM_SAMPLES, batch_size * world_size, rank=0, world_size=1, seed=5)
    for step in range(STEPS):
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    return model


def _train_distributed(model, x, y, comm, algorithm: str, bucket_mb: float, batch_size: int = 8) -> torch.nn.Module:
    model = copy.deepcopy(model)
    # Start from different weights on purpose: wrap must copy rank 0's.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(comm.rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = hpcdl.wrap(model, optimizer, algorithm=algorithm, bucket_mb=bucket_mb, comm=comm)
    sampler = GlobalBatchSampler(NUM_SAMPLES, batch_size, rank=comm.rank, world_size=comm.size, seed=5)
    for step in range(STEPS):
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        total = int(comm.allreduce_scalars([len(batch)])[0])
        optimizer.zero_grad()
        optimizer.set_sample_count(len(batch), total)
        if len(batch):
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    hpcdl.finish(model, optimizer)
    return model


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "hierarchical", "auto"])
@pytest.mark.parametrize("ranks", [2, 4])
def test_allreduce_equals_single_process_large_batch(subcomms, ranks, algorithm):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    model, x, y = _problem()
    # A tiny bucket size splits the model into several buckets.
    distributed = _train_distributed(model, x, y, comm, algorithm, bucket_mb=0.001)
    reference = _train_single_process(model, x, y, ranks, 8)
    for got, want in zip(distributed.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_uneven_last_batch_with_empty_ranks(world):
    # 4 ranks with batch 37 take 148 samples per step, so the second step of each
    # epoch has 2 samples: ranks 2 and 3 contribute nothing and must not hang.
    assert len(GlobalBatchSampler(NUM_SAMPLES, 37, rank=3, world_size=4, seed=5).indices(0, 1)) == 0
    model, x, y = _problem()
    distributed = _train_distributed(model, x, y, world, "ring", bucket_mb=0.001, batch_size=37)
    reference = _train_single_process(model, x, y, 4, 37)
    for got, want in zip(distributed.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_finish_leaves_bit_identical_parameters(world):
    model, x, y = _problem()
    trained = _train_distributed(model, x, y, world, "ring", bucket_mb=25)
    flat = torch.cat([p.detach().reshape(-1) for p in trained.parameters()])
    gathered = world.allgather(flat)
    for other in gathered:
        assert torch.equal(other, flat)
