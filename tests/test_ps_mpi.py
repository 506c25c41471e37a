"""Parameter server on real MPI ranks: no lost updates, rejected messages, bsp-ps and ssp equivalences.

A shard runs on a thread of rank 0, so that all 4 ranks of the test job can be workers.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import hpcdl
from hpcdl.comm import Communicator
from hpcdl.compression import build_compressor
from hpcdl.data import GlobalBatchSampler
from hpcdl.ps import protocol as p
from hpcdl.ps.client import PSClient
from hpcdl.ps.layout import PSLayout
from hpcdl.ps.server import ServerSettings, ShardServer

pytestmark = pytest.mark.mpi(min_size=4)


class ShardThread:
    """A shard served on a thread of rank 0; every rank of ``world`` is a worker."""

    def __init__(self, world: Communicator, settings: ServerSettings) -> None:
        self.comm = world.dup()
        self.server = None
        self.thread = None
        if world.rank == 0:
            self.server = ShardServer(self.comm, 0, list(range(world.size)), settings)
            self.thread = threading.Thread(target=self.server.serve, daemon=True)
            self.thread.start()

    def layout(self, world: Communicator) -> PSLayout:
        return PSLayout(self.comm, [0], list(range(world.size)), world)

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=60)
            assert not self.thread.is_alive(), "shard did not stop after every worker sent DONE"


def test_concurrent_pushes_never_lost(world):
    shard = ShardThread(world, ServerSettings(mode="async", optimizer="sgd"))
    client = PSClient(shard.comm, [0], 1, timeout_s=120)
    params = torch.tensor([10.0])
    if world.rank == 0:
        client.init(params)
    world.barrier()

    for clock in range(1, 51):
        client.push_pull(torch.ones(1), params, clock, lr=1.0)
    world.barrier()
    client.pull(params)
    client.done()
    shard.join()

    assert params.item() == 10.0 - 50 * world.size
    assert client.versions == [50 * world.size]


def _serve_zeros(world, numel: int, settings: ServerSettings, **client_options):
    """Start a shard of ``numel`` zeros; return the shard, this rank's client and its parameters."""
    shard = ShardThread(world, settings)
    client = PSClient(shard.comm, [0], numel, timeout_s=120, **client_options)
    params = torch.zeros(numel)
    if world.rank == 0:
        client.init(params)
    world.barrier()
    return shard, client, params


def _send_raw(comm: MPI.Comm, header: torch.Tensor, payload: bytes | None) -> int:
    """Send a header (and payload) as they are; return the reply status."""
    reply = torch.empty(p.REPLY_FIELDS, dtype=torch.float64)
    request = comm.Irecv([reply.numpy(), MPI.DOUBLE], source=0, tag=p.TAG_REPLY)
    comm.Send([header.numpy(), MPI.DOUBLE], dest=0, tag=p.TAG_REQUEST)
    if payload is not None:
        comm.Send([payload, MPI.BYTE], dest=0, tag=p.TAG_REQUEST_DATA)
    request.Wait()
    status = int(reply[p.R_STATUS])
    if status == p.Status.OK:
        # The reply to a valid push also carries the parameters.
        data = torch.empty(int(reply[p.R_NUMEL]), dtype=torch.float32)
        comm.Recv([data.numpy(), MPI.FLOAT], source=0, tag=p.TAG_REPLY_DATA)
    return status


def test_invalid_messages_rejected_server_survives(world):
    numel = 6
    shard, client, params = _serve_zeros(world, numel, ServerSettings(mode="async", optimizer="sgd"))

    if world.rank == 1:
        raw = shard.comm.comm
        good = p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel, clock=1, lr=0.1)
        cases = {
            "shape": (p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel + 1, clock=1), bytes(4 * (numel + 1))),
            "shard": (p.make_header(p.Kind.PUSH_PULL, 3, 1, numel=numel, clock=1), bytes(4 * numel)),
            "length": (good, bytes(4 * numel - 2)),
            "worker": (p.make_header(p.Kind.PUSH_PULL, 0, 2, numel=numel, clock=1), bytes(4 * numel)),
            "clock": (p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel, clock=5), bytes(4 * numel)),
            "version": (p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel, clock=1, version=99), bytes(4 * numel)),
            "header size": (torch.zeros(3, dtype=torch.float64), None),
        }
        dtype_header = good.clone()
        dtype_header[p.DTYPE] = 9
        cases["dtype"] = (dtype_header, bytes(4 * numel))
        statuses = {name: _send_raw(raw, header, payload) for name, (header, payload) in cases.items()}
        assert statuses["shape"] == p.Status.BAD_SHAPE
        assert statuses["shard"] == p.Status.BAD_SHARD
        assert statuses["length"] == p.Status.BAD_LENGTH
        assert statuses["worker"] == p.Status.BAD_WORKER
        assert statuses["clock"] == p.Status.BAD_CLOCK
        assert statuses["version"] == p.Status.BAD_VERSION
        assert statuses["header size"] == p.Status.BAD_HEADER
        assert statuses["dtype"] == p.Status.BAD_DTYPE
        _fuzz_headers(raw, numel)
    world.barrier()

    # The shard still serves valid pushes from every worker.
    client.push_pull(torch.ones(numel), params, 1, lr=0.5)
    world.barrier()
    client.pull(params)
    client.done()
    shard.join()
    assert torch.equal(params, torch.full((numel,), -0.5 * world.size))


def _fuzz_headers(raw: MPI.Comm, numel: int) -> None:
    """Send random invalid headers and payload lengths from this rank; each must be rejected."""
    field = st.floats(allow_nan=True, allow_infinity=True, width=64)

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(values=st.lists(field, min_size=p.HEADER_FIELDS, max_size=p.HEADER_FIELDS),
           payload_nbytes=st.integers(min_value=0, max_value=64))
    def check(values: list[float], payload_nbytes: int) -> None:
        header = torch.tensor(values, dtype=torch.float64)
        header[p.KIND] = p.Kind.PUSH_PULL
        header[p.WORKER] = raw.Get_rank()
        # Clock 1 was never the next clock after the valid pushes below, so
        # a push is rejected even when every other field happens to be valid.
        header[p.CLOCK] = 1000
        status = _send_raw(raw, header, bytes(payload_nbytes))
        assert status != p.Status.OK

    check()


def _problem():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(120, 10, generator=generator)
    y = torch.randint(0, 3, (120,), generator=generator)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, x, y


def _train(model, x, y, comm, strategy: str, momentum: float, layout=None, steps: int = 8,
           compression: str = "none"):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    model, optimizer = hpcdl.wrap(model, optimizer, strategy=strategy, comm=comm, ps_layout=layout,
                                  compression=compression)
    sampler = GlobalBatchSampler(len(x), 8, rank=comm.rank, world_size=comm.size, seed=5)
    for step in range(steps):
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        optimizer.set_sample_count(len(batch), sampler.samples_in_step(index))
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
    hpcdl.finish(model, optimizer)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def _train_ps(world, mode: str, spec: str, momentum: float, compression: str = "none"):
    model, x, y = _problem()
    shard = ShardThread(world, ServerSettings(mode=mode, staleness=0, optimizer="sgd", momentum=momentum,
                                              compression=compression))
    result = _train(model, x, y, world, spec, momentum, layout=shard.layout(world), compression=compression)
    shard.join()
    return result


def test_bsp_ps_matches_allreduce(world):
    model, x, y = _problem()
    reference = _train(model, x, y, world, "allreduce", momentum=0.9)
    result = _train_ps(world, "bsp", "bsp-ps", momentum=0.9)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6)


def test_ssp_staleness_zero_matches_bsp_ps(world):
    # Plain SGD: ssp applies each push on arrival, and a sum of single SGD
    # steps equals one step on the sum only without momentum.
    bsp = _train_ps(world, "bsp", "bsp-ps", momentum=0.0)
    ssp = _train_ps(world, "ssp", "ssp:staleness=0", momentum=0.0)
    torch.testing.assert_close(ssp, bsp, rtol=1e-5, atol=1e-6)


# Lossless settings: top-k keeping every element, and PowerSGD at a rank no
# smaller than any matrix dimension of the model (10 x 16 and 16 x 3).
@pytest.mark.parametrize("compression", ["topk:ratio=1.0", "powersgd:rank=16", "fp16"])
def test_compressed_pushes_decode_to_the_uncompressed_run(world, compression):
    plain = _train_ps(world, "bsp", "bsp-ps", momentum=0.9)
    compressed = _train_ps(world, "bsp", "bsp-ps", momentum=0.9, compression=compression)
    # fp16 rounds every gradient element, so only its tolerance is wider.
    tolerance = 2e-3 if compression == "fp16" else 1e-5
    torch.testing.assert_close(compressed, plain, rtol=tolerance, atol=tolerance)


def test_compressed_push_layout_enforced(world):
    numel = 40
    compression = "topk:ratio=0.25"
    shard, client, params = _serve_zeros(world, numel, ServerSettings(mode="async", optimizer="sgd",
                                                                      compression=compression),
                                         compressor=build_compressor(compression), shapes=[(4, 10)])

    if world.rank == 1:
        raw = shard.comm.comm
        expected = client.compressor.encoded_nbytes(numel, shapes=[(4, 10)])
        float_push = p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel, clock=1, lr=0.1)
        short_push = p.make_header(p.Kind.PUSH_PULL, 0, 1, numel=numel, clock=1, lr=0.1,
                                   encoded_nbytes=expected - 1)
        assert _send_raw(raw, float_push, bytes(4 * numel)) == p.Status.BAD_DTYPE
        assert _send_raw(raw, short_push, bytes(expected - 1)) == p.Status.BAD_LENGTH
    world.barrier()

    # Valid compressed pushes from every worker: 10 of 40 elements each, the
    # same 10 largest ones, so the shard applies exactly those.
    gradient = torch.zeros(numel)
    gradient[:10] = 1.0
    sent_before = shard.comm.bytes_sent
    client.push_pull(gradient, params, 1, lr=0.5)
    if world.rank != 0:  # rank 0's counter also counts its shard's replies
        # The header and the encoded payload: 10 float32 values and 10 int32 indices.
        assert shard.comm.bytes_sent - sent_before == p.HEADER_BYTES + 10 * 4 + 10 * 4
    world.barrier()
    client.pull(params)
    client.done()
    shard.join()
    assert torch.equal(params[:10], torch.full((10,), -0.5 * world.size))
    assert torch.equal(params[10:], torch.zeros(numel - 10))
