"""The Horovod all-reduce backend equals hpcdl's ring, alone and inside the ``allreduce`` strategy."""

from __future__ import annotations

import copy

import pytest
import torch

import hpcdl
from hpcdl.comm.horovod import ring_model_bytes
from hpcdl.comm.ring import ring_allreduce
from hpcdl.data import GlobalBatchSampler

pytestmark = pytest.mark.mpi(min_size=4)

pytest.importorskip("horovod.torch", reason="Horovod is not installed; run 'make horovod' to build it")

NUM_SAMPLES = 96
STEPS = 8


# The two backends add in different orders, and Horovod reduces bfloat16 in float32,
# so half-precision results may differ by a few units in the last place.
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-6, 1e-6), (torch.float64, 1e-12, 1e-12),
                                               (torch.float16, 2e-3, 1e-2), (torch.bfloat16, 2e-2, 5e-2)])
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_horovod_allreduce_equals_ring(world, dtype, rtol, atol, numel):
    generator = torch.Generator().manual_seed(11 + world.rank)
    data = torch.randn(numel, generator=generator).to(dtype)
    by_ring = data.clone()
    by_horovod = data.clone()

    world.allreduce(by_ring, algorithm="ring")
    world.allreduce(by_horovod, algorithm="horovod")

    torch.testing.assert_close(by_horovod, by_ring, rtol=rtol, atol=atol)


@pytest.mark.parametrize("numel", [1, 3, 1000, 4099])
def test_horovod_bytes_model_equals_ring_count(world, numel):
    data = torch.ones(numel)
    sent_by_ring = ring_allreduce(world.comm, data)
    assert ring_model_bytes(numel, data.element_size(), world.rank, world.size) == sent_by_ring


def _train(comm, algorithm: str) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(NUM_SAMPLES, 10, generator=generator)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # A tiny bucket size splits the model into several buckets reduced during backward.
    model, optimizer = hpcdl.wrap(model, optimizer, algorithm=algorithm, bucket_mb=0.001, comm=comm)
    sampler = GlobalBatchSampler(NUM_SAMPLES, 8, rank=comm.rank, world_size=comm.size, seed=5)
    for step in range(STEPS):
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    hpcdl.finish(model, optimizer)
    return copy.deepcopy(model)


def test_allreduce_strategy_horovod_equals_ring(world):
    by_ring = _train(world, "ring")
    by_horovod = _train(world, "horovod")
    for got, want in zip(by_horovod.parameters(), by_ring.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
