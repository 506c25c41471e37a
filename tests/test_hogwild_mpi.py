"""Hogwild across emulated nodes on real MPI ranks: exact accumulates, identical final parameters, training.

``ranks_per_node`` groups consecutive ranks into nodes, so one machine runs
several nodes, each with its own shared-memory window.
"""

from __future__ import annotations

import pytest
import torch

import hpcdl
from hpcdl.comm import Communicator
from hpcdl.comm.ring import chunk_bounds

pytestmark = pytest.mark.mpi(min_size=4)

STEPS = 100


def _nodes(world: Communicator, ranks_per_node: int) -> Communicator:
    """Return a duplicate of ``world`` whose nodes are groups of ``ranks_per_node`` consecutive ranks."""
    return Communicator(world.comm.Dup(), ranks_per_node=ranks_per_node)


class Vector(torch.nn.Module):
    """A model that is one flat parameter vector."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(numel))


@pytest.mark.parametrize("ranks_per_node", [1, 2, 3])
def test_accumulates_across_nodes_exact(world, ranks_per_node):
    comm = _nodes(world, ranks_per_node)
    nodes = -(-comm.size // ranks_per_node)
    node_of = [rank // ranks_per_node for rank in range(comm.size)]
    model = Vector(64)
    model, optimizer = hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), strategy="hogwild",
                                  comm=comm)
    bounds = chunk_bounds(64, nodes)

    # Each step adds exactly 1 to every slice that another node owns, so those
    # slices receive updates only through MPI_Accumulate.
    grad = torch.zeros(64)
    for index, (start, end) in enumerate(bounds):
        if index != node_of[comm.rank]:
            grad[start:end] = -1.0
    for _ in range(STEPS):
        optimizer.zero_grad()
        model.weight.grad = grad.clone()
        optimizer.step()
    hpcdl.finish(model, optimizer)

    for index, (start, end) in enumerate(bounds):
        senders = sum(1 for node in node_of if node != index)
        expected = torch.full((end - start,), float(STEPS * senders))
        assert torch.equal(model.weight.detach()[start:end], expected), f"slice of node {index}"


@pytest.mark.parametrize("ranks_per_node", [0, 2])
def test_finish_gives_identical_parameters(world, ranks_per_node):
    comm = _nodes(world, ranks_per_node)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model, optimizer = hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  strategy="hogwild", comm=comm)
    # Different data on every rank, so that every rank's updates differ.
    generator = torch.Generator().manual_seed(100 + comm.rank)
    for _ in range(50):
        x = torch.randn(16, 8, generator=generator)
        y = torch.randint(0, 2, (16,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    hpcdl.finish(model, optimizer)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = comm.allgather(flat)
    for rank in range(1, comm.size):
        assert torch.equal(gathered[rank], gathered[0]), f"rank {rank} differs from rank 0"


def test_two_nodes_train_mlp(world):
    comm = _nodes(world, 2)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(512, 10, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    with torch.no_grad():
        initial = float(torch.nn.functional.cross_entropy(model(x), y))
    model, optimizer = hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=0.05), strategy="hogwild",
                                  comm=comm)

    shard = torch.arange(comm.rank, len(x), comm.size)
    for step in range(120):
        batch = shard[(step * 16) % len(shard):][:16]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    hpcdl.finish(model, optimizer)

    with torch.no_grad():
        final = float(torch.nn.functional.cross_entropy(model(x), y))
    assert final < 0.5 * initial, f"loss went from {initial:.4f} to {final:.4f}"


def test_load_state_dict_shares_loaded_parameters(world):
    comm = _nodes(world, 2)
    model = Vector(10)
    model, optimizer = hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), strategy="hogwild",
                                  comm=comm)
    state = optimizer.state_dict()
    with torch.no_grad():
        model.weight.copy_(torch.arange(10.0))
    optimizer.load_state_dict(state)

    # A step that changes nothing refreshes the parameters from the shared slices.
    optimizer.zero_grad()
    model.weight.grad = torch.zeros(10)
    optimizer.step()
    hpcdl.finish(model, optimizer)
    assert torch.equal(model.weight.detach(), torch.arange(10.0))


def test_float64_model_rejected(world):
    comm = _nodes(world, 2)
    model = Vector(4).double()
    with pytest.raises(ValueError, match="float32 parameters only"):
        hpcdl.wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), strategy="hogwild", comm=comm)
