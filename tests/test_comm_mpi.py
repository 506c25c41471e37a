"""The tensor communicator on real MPI ranks: ring against MPI_Allreduce, byte counts, p2p."""

from __future__ import annotations

import pytest
import torch

from hpcdl.comm import Communicator, chunk_bounds

pytestmark = pytest.mark.mpi(min_size=4)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sizes(n: int) -> list[int]:
    return [1, n - 1, n + 1, 101, 1_500_007]  # 101 is prime; 1.5M float32 is 6 MB


def _integer_input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    # Small integers make every summation order exact in all three dtypes.
    generator = torch.Generator().manual_seed(1000 * rank + numel)
    return torch.randint(-8, 9, (numel,), generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_ring_matches_mpi_allreduce(subcomms, ranks, dtype):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    for numel in _sizes(ranks):
        if numel == 0:
            continue
        ring = _integer_input(comm.rank, numel, dtype)
        vendor = ring.clone()
        comm.allreduce(ring, algorithm="ring")
        comm.allreduce(vendor, algorithm="mpi")
        expected = sum(_integer_input(r, numel, torch.float64) for r in range(ranks)).to(dtype)
        assert torch.equal(ring, vendor), f"ring != MPI_Allreduce for {numel} elements"
        assert torch.equal(ring, expected), f"ring != exact sum for {numel} elements"


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_ring_random_floats_close_and_identical(subcomms, ranks):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    generator = torch.Generator().manual_seed(comm.rank)
    data = torch.randn(100_003, generator=generator)
    ring, vendor = data.clone(), data.clone()
    comm.allreduce(ring, algorithm="ring")
    comm.allreduce(vendor, algorithm="mpi")
    torch.testing.assert_close(ring, vendor, rtol=1e-5, atol=1e-5)
    # Every rank must hold the same bytes, or replicas drift apart.
    gathered = comm.allgather(ring)
    for other in gathered:
        assert torch.equal(other, ring)


def test_ring_bytes_sent_is_bandwidth_optimal(subcomms):
    comm = subcomms[4]
    numel = 1_000_003
    tensor = torch.ones(numel)
    before = comm.bytes_sent
    comm.allreduce(tensor, algorithm="ring")
    sent = comm.bytes_sent - before
    bounds = chunk_bounds(numel, 4)
    chunk_bytes = [(stop - start) * 4 for start, stop in bounds]
    # Reduce-scatter sends every chunk but rank+1 (the one this rank ends up
    # owning); all-gather sends every chunk but rank+2 (the one it receives last).
    expected = (sum(chunk_bytes) - chunk_bytes[(comm.rank + 1) % 4]
                + sum(chunk_bytes) - chunk_bytes[(comm.rank + 2) % 4])
    assert sent == expected
    assert abs(sent - 2 * 3 / 4 * numel * 4) <= 2 * 3 * 4


def test_average_divides_by_ranks(world):
    tensor = torch.full((10,), float(world.rank))
    world.allreduce(tensor, algorithm="ring", average=True)
    assert torch.allclose(tensor, torch.full((10,), sum(range(world.size)) / world.size))


def test_hierarchical_with_emulated_nodes(world):
    comm = Communicator(world.comm, ranks_per_node=2)
    assert comm.node_comm().size == 2
    tensor = torch.arange(1000, dtype=torch.float32) * (world.rank + 1)
    comm.allreduce(tensor, algorithm="hierarchical")
    expected = torch.arange(1000, dtype=torch.float32) * sum(range(1, world.size + 1))
    assert torch.equal(tensor, expected)


def test_broadcast_from_nonzero_root(world):
    tensor = torch.full((7, 3), float(world.rank), dtype=torch.bfloat16)
    world.broadcast(tensor, root=world.size - 1)
    assert torch.equal(tensor, torch.full((7, 3), float(world.size - 1), dtype=torch.bfloat16))


def test_allgather_and_allgatherv(world):
    gathered = world.allgather(torch.tensor([world.rank, 10 * world.rank]))
    assert gathered.tolist() == [[r, 10 * r] for r in range(world.size)]
    pieces = world.allgatherv(torch.full((world.rank + 1,), float(world.rank)))
    assert [p.tolist() for p in pieces] == [[float(r)] * (r + 1) for r in range(world.size)]


def test_send_recv_ring_of_ranks(world):
    right, left = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    outgoing = torch.full((5,), float(world.rank), dtype=torch.float16)
    incoming = torch.empty(5, dtype=torch.float16)
    request = world.irecv(incoming, source=left, tag=3)
    before = world.bytes_sent
    world.send(outgoing, dest=right, tag=3)
    request.Wait()
    assert world.bytes_sent - before == 10
    assert torch.equal(incoming, torch.full((5,), float(left), dtype=torch.float16))
