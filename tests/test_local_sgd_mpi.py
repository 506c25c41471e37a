"""Local SGD, hierarchical and DiLoCo strategies and the gradient transforms on real ranks."""

from __future__ import annotations

import copy

import pytest
import torch

import hpcdl
from hpcdl.checkpoint import flatten_state, unflatten_state
from hpcdl.comm import Communicator
from hpcdl.data import GlobalBatchSampler
from hpcdl.transforms import NonFiniteGradientError

pytestmark = pytest.mark.mpi(min_size=4)

NUM_SAMPLES = 192
BATCH = 8


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(NUM_SAMPLES, 10, generator=generator)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    return x, y


def _mlp() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batchnorm_model() -> torch.nn.Module:
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _sgd(model: torch.nn.Module, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)


class Run:
    """One data-parallel training run of a small model on this rank's shard."""

    def __init__(self, model: torch.nn.Module, comm: Communicator, strategy: str, *, momentum: float = 0.0,
                 optimizer: str = "sgd", **wrap_options) -> None:
        self.comm = comm
        self.x, self.y = _data()
        self.model = copy.deepcopy(model)
        if optimizer == "adamw":
            inner = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        else:
            inner = _sgd(self.model, momentum)
        self.model, self.optimizer = hpcdl.wrap(self.model, inner, strategy=strategy, comm=comm, **wrap_options)
        self.sampler = GlobalBatchSampler(NUM_SAMPLES, BATCH, rank=comm.rank, world_size=comm.size, seed=5)
        self.step = 0

    def batch(self) -> torch.Tensor:
        epoch, index = divmod(self.step, self.sampler.steps_per_epoch())
        return self.sampler.indices(epoch, index)

    def train(self, steps: int, *, inf_on_rank: int | None = None):
        result = None
        for _ in range(steps):
            batch = self.batch()
            self.optimizer.zero_grad()
            self.optimizer.set_sample_count(len(batch), BATCH * self.comm.size)
            loss = torch.nn.functional.cross_entropy(self.model(self.x[batch]), self.y[batch])
            if inf_on_rank == self.comm.rank:
                loss = loss * float("inf")
            self.optimizer.scale_loss(loss).backward()
            result = self.optimizer.step()
            self.step += 1
        return result

    def finish(self) -> torch.nn.Module:
        hpcdl.finish(self.model, self.optimizer)
        return self.model


def _flat_state(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in model.state_dict().values()])


def _assert_same_on_every_rank(comm: Communicator, model: torch.nn.Module) -> None:
    flat = _flat_state(model)
    for other in comm.allgather(flat):
        assert torch.equal(other, flat)


def _assert_models_close(got: torch.nn.Module, want: torch.nn.Module) -> None:
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("ranks", [2, 4])
def test_local_sgd_period_one_matches_allreduce(subcomms, ranks):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    model = _mlp()
    local = Run(model, comm, "local-sgd:period=1")
    local.train(7)
    reference = Run(model, comm, "allreduce")
    reference.train(7)
    _assert_models_close(local.finish(), reference.finish())


def test_hierarchical_period_one_matches_allreduce(world):
    comm = Communicator(world.comm, ranks_per_node=2)
    model = _mlp()
    hierarchical = Run(model, comm, "hierarchical:period=1")
    hierarchical.train(7)
    reference = Run(model, comm, "allreduce")
    reference.train(7)
    _assert_models_close(hierarchical.finish(), reference.finish())


def test_hierarchical_syncs_nodes_every_period(world):
    comm = Communicator(world.comm, ranks_per_node=2)
    run = Run(_mlp(), comm, "hierarchical:period=3", momentum=0.9)
    run.train(1)
    states = comm.allgather(_flat_state(run.model))
    node_peer = comm.rank ^ 1
    other_node = (comm.rank + 2) % 4
    assert torch.equal(states[node_peer], states[comm.rank])
    assert not torch.equal(states[other_node], states[comm.rank])
    run.train(2)
    _assert_same_on_every_rank(comm, run.model)


@pytest.mark.parametrize("ranks", [2, 4])
def test_diloco_unit_outer_step_matches_local_sgd(subcomms, ranks):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    model = _mlp()
    diloco = Run(model, comm, "diloco:period=3,outer_lr=1,outer_momentum=0", momentum=0.9)
    diloco.train(8)
    local = Run(model, comm, "local-sgd:period=3", momentum=0.9)
    local.train(8)
    _assert_models_close(diloco.model, local.model)
    _assert_models_close(diloco.finish(), local.finish())


def test_local_sgd_warmup_runs_synchronous_steps(world):
    model = _mlp()
    run = Run(model, world, "local-sgd:period=4,warmup=3")
    run.train(3)
    _assert_same_on_every_rank(world, run.model)
    run.train(1)
    flat = _flat_state(run.model)
    assert not all(torch.equal(other, flat) for other in world.allgather(flat))
    run.train(3)
    _assert_same_on_every_rank(world, run.model)


STRATEGIES = ["allreduce", "local-sgd:period=2", "hierarchical:period=2",
              "diloco:period=2,outer_lr=0.7,outer_momentum=0.9"]


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
def test_batchnorm_buffers_identical_after_each_round(world, strategy):
    comm = Communicator(world.comm, ranks_per_node=2)
    run = Run(_batchnorm_model(), comm, strategy, momentum=0.9)
    for _ in range(3):
        run.train(1)
        running_mean = run.model[1].running_mean.clone()
        assert not all(torch.equal(other, running_mean) for other in comm.allgather(running_mean))
        run.train(1)
        _assert_same_on_every_rank(comm, run.model)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_finish_leaves_bit_identical_state(world, strategy):
    comm = Communicator(world.comm, ranks_per_node=2)
    run = Run(_batchnorm_model(), comm, strategy, momentum=0.9)
    run.train(5)
    _assert_same_on_every_rank(comm, run.finish())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_inf_on_one_rank_skips_every_rank(world, strategy, precision):
    comm = Communicator(world.comm, ranks_per_node=2)
    run = Run(_mlp(), comm, strategy, momentum=0.9, precision=precision)
    run.train(1)
    before = _flat_state(run.model)
    scale_before = run.optimizer.loss_scale

    run.train(1, inf_on_rank=1)

    assert torch.equal(_flat_state(run.model), before)
    assert run.optimizer.strategy.skipped_steps == 1
    assert run.optimizer.strategy.steps == 1
    if precision == "fp16":
        assert scale_before == 2.0 ** 16
        assert run.optimizer.loss_scale == 2.0 ** 15
    run.train(1)
    assert run.optimizer.strategy.steps == 2
    assert torch.isfinite(_flat_state(run.model)).all()


def test_consecutive_skips_fail_naming_rank(world):
    run = Run(_mlp(), world, "local-sgd:period=2", max_skipped_steps=2)
    run.train(1, inf_on_rank=2)
    with pytest.raises(NonFiniteGradientError, match="rank 2"):
        run.train(1, inf_on_rank=2)


def _grad_of_full_batch(model: torch.nn.Module, x, y, chunks: list[torch.Tensor], extra=None) -> None:
    total = sum(len(c) for c in chunks)
    for i, chunk in enumerate(chunks):
        out = model(x[chunk])
        if extra is not None and i % 2 == 0:
            out = out + extra
        (torch.nn.functional.cross_entropy(out, y[chunk]) * (len(chunk) / total)).backward()


@pytest.mark.parametrize("strategy", ["allreduce", "hierarchical:period=1"])
def test_accumulate_matches_large_batch(world, strategy):
    # ``extra`` is used only by the first of each rank's two micro-batches.
    comm = Communicator(world.comm, ranks_per_node=2)
    x, y = _data()
    model = _mlp()
    extra = torch.nn.Parameter(torch.zeros(3))
    reference = copy.deepcopy(model)
    reference_extra = torch.nn.Parameter(torch.zeros(3))
    reference_optimizer = torch.optim.SGD(list(reference.parameters()) + [reference_extra], lr=0.1, momentum=0.9)

    holder = torch.nn.ModuleDict({"net": model})
    holder.register_parameter("extra", extra)
    optimizer = torch.optim.SGD(holder.parameters(), lr=0.1, momentum=0.9)
    holder, optimizer = hpcdl.wrap(holder, optimizer, strategy=strategy, comm=comm, bucket_mb=0.0005)
    steps, micro = 4, 4
    per_step = micro * 2 * comm.size
    bytes_per_step = []
    for step in range(steps):
        batch = torch.arange(step * per_step, (step + 1) * per_step)
        mine = batch.reshape(comm.size, -1)[comm.rank]
        chunks = list(torch.tensor_split(mine, 2))
        sent_before = comm.bytes_sent
        optimizer.zero_grad()
        optimizer.set_sample_count(len(mine), per_step)
        with optimizer.no_sync():
            out = holder["net"](x[chunks[0]]) + holder.extra
            (torch.nn.functional.cross_entropy(out, y[chunks[0]]) * 0.5).backward()
        out = holder["net"](x[chunks[1]])
        (torch.nn.functional.cross_entropy(out, y[chunks[1]]) * 0.5).backward()
        optimizer.step()
        bytes_per_step.append(comm.bytes_sent - sent_before)

        reference_optimizer.zero_grad()
        all_chunks = [c for rank_batch in batch.reshape(comm.size, -1) for c in torch.tensor_split(rank_batch, 2)]
        _grad_of_full_batch(reference, x, y, all_chunks, reference_extra)
        reference_optimizer.step()
    hpcdl.finish(holder, optimizer)

    _assert_models_close(holder["net"], reference)
    torch.testing.assert_close(extra.detach(), reference_extra.detach(), rtol=1e-5, atol=1e-6)
    assert len(set(bytes_per_step)) == 1


def test_accumulate_reduces_once_per_step(world):
    x, y = _data()
    model = _mlp()
    sent = {}
    for micro in (1, 4):
        net = copy.deepcopy(model)
        net, optimizer = hpcdl.wrap(net, _sgd(net), comm=world, bucket_mb=0.0005)
        before = world.bytes_sent
        optimizer.zero_grad()
        optimizer.set_sample_count(BATCH, BATCH * world.size)
        chunks = torch.tensor_split(torch.arange(BATCH), micro)
        for i, chunk in enumerate(chunks):
            context = optimizer.no_sync() if i < len(chunks) - 1 else torch.enable_grad()
            with context:
                (torch.nn.functional.cross_entropy(net(x[chunk]), y[chunk]) * (len(chunk) / BATCH)).backward()
        optimizer.step()
        sent[micro] = world.bytes_sent - before
        hpcdl.finish(net, optimizer)
    assert sent[1] == sent[4]


@pytest.mark.parametrize("ranks", [2, 4])
def test_clip_matches_single_process_full_batch(subcomms, ranks):
    comm = subcomms.get(ranks)
    if comm is None:
        return
    model = _mlp()
    run = Run(model, comm, "allreduce", momentum=0.9, clip_norm=0.05)
    reference = copy.deepcopy(model)
    optimizer = _sgd(reference, momentum=0.9)
    sampler = GlobalBatchSampler(NUM_SAMPLES, BATCH * ranks, rank=0, world_size=1, seed=5)
    norms = []
    for step in range(6):
        run.train(1)
        epoch, index = divmod(step, sampler.steps_per_epoch())
        batch = sampler.indices(epoch, index)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(run.x[batch]), run.y[batch]).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)))
        optimizer.step()
        torch.testing.assert_close(run.optimizer.transforms.last_grad_norm, norms[-1], rtol=1e-5, atol=0)
    assert min(norms) > 0.05
    _assert_models_close(run.finish(), reference)


def _round_trip(state):
    tensors, tree = flatten_state(state)
    return unflatten_state(tree, tensors)


@pytest.mark.parametrize("strategy", ["local-sgd:period=4,warmup=1", "hierarchical:period=4",
                                      "diloco:period=4,outer_lr=0.7,outer_momentum=0.9"])
def test_resume_mid_round_matches_uninterrupted(world, strategy):
    comm = Communicator(world.comm, ranks_per_node=2)
    model = _batchnorm_model()
    uninterrupted = Run(model, comm, strategy, optimizer="adamw", precision="fp16")
    uninterrupted.train(10)
    expected = uninterrupted.finish()

    first = Run(model, comm, strategy, optimizer="adamw", precision="fp16")
    first.train(6)
    saved_model = _round_trip(first.model.state_dict())
    saved_optimizer = _round_trip(first.optimizer.state_dict())
    first.optimizer.strategy.close()

    resumed = Run(model, comm, strategy, optimizer="adamw", precision="fp16")
    resumed.model.load_state_dict(saved_model)
    resumed.optimizer.load_state_dict(saved_optimizer)
    resumed.step = 6
    resumed.train(4)
    for got, want in zip(resumed.finish().state_dict().values(), expected.state_dict().values()):
        assert torch.equal(got, want)


def test_trainer_accumulate_matches_one_micro_batch(world, tmp_path):
    from hpcdl.config import TrainConfig
    from hpcdl.trainer import Trainer

    base = world.bcast_object(str(tmp_path))
    params = {}
    sent = {}
    for micro_batches in (1, 2):
        config = TrainConfig(dataset="digits", model="mlp", hidden=16, steps=3, batch_size=16,
                             accumulate=micro_batches, progress="off", log_every=100,
                             run_dir=f"{base}/accumulate{micro_batches}")
        trainer = Trainer(config)
        before = trainer.comm.bytes_sent
        trainer.fit()
        sent[micro_batches] = trainer.comm.bytes_sent - before
        params[micro_batches] = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    torch.testing.assert_close(params[2], params[1], rtol=1e-5, atol=1e-6)
    assert sent[2] == sent[1]
