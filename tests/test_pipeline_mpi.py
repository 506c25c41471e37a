"""Pipelined training equals the unsplit model in one process, under GPipe and 1F1B."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hpcdl.parallel import PipelineStage, micro_batch_sizes, split_micro_batches, split_stage

pytestmark = pytest.mark.mpi(min_size=4)

BATCH = 10  # not divisible by 3, 4 or 8


def _model() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 12),
                         nn.Tanh(), nn.Linear(12, 4))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=generator), torch.randint(0, 4, (BATCH,), generator=generator)


def _reference(steps: int) -> tuple[list[float], nn.Sequential, list[list[torch.Tensor]]]:
    """Train the unsplit model with the full batch; return losses, the model and each step's gradients."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, grads = [], []
    for step in range(steps):
        x, y = _data(step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return losses, model, grads


def _train_pipelined(comm, schedule: str, micro_batches: int, steps: int):
    full = _model()
    stage = PipelineStage(split_stage(full, comm.rank, comm.size), comm, schedule=schedule,
                          loss_fn=nn.functional.cross_entropy)
    optimizer = torch.optim.SGD(stage.module.parameters(), lr=0.1, momentum=0.9)
    stage.negotiate_shapes(_data(0)[0][:1] if stage.is_first else None)
    losses, grads = [], []
    for step in range(steps):
        x, y = _data(step)
        sizes = micro_batch_sizes(BATCH, micro_batches)
        optimizer.zero_grad()
        stats = stage.train_step(sizes, inputs=split_micro_batches(x, sizes), targets=split_micro_batches(y, sizes))
        # The loss lives on the last stage; share it with every stage.
        loss_sum, samples = comm.allreduce_scalars([stats.loss_sum, stats.samples])
        losses.append(float(loss_sum / samples))
        grads.append([p.grad.clone() for p in stage.module.parameters()])
        optimizer.step()
    return full, stage, losses, grads


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_single_process(subcomms, stages, schedule):
    comm = subcomms.get(stages)
    if comm is None:
        return  # this rank is outside the sub-communicator, which makes no collective with it
    steps = 2
    ref_losses, _, ref_grads = _reference(steps)
    reference_params = list(_model().parameters())
    for micro_batches in (1, 2, 3, 8):
        full, stage, losses, grads = _train_pipelined(comm, schedule, micro_batches, steps)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), f"M={micro_batches}"
        # Map this stage's parameters back to their index in the unsplit model.
        index = {id(p): i for i, p in enumerate(full.parameters())}
        for step in range(steps):
            for param, grad in zip(stage.module.parameters(), grads[step]):
                expected = ref_grads[step][index[id(param)]]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6,
                                           msg=f"M={micro_batches} step={step}")
    assert len(reference_params) == 8


def test_pipeline_bubble_and_memory_recorded(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    results = {}
    for schedule in ("gpipe", "1f1b"):
        _, stage, _, _ = _train_pipelined(comm, schedule, 8, 1)
        x, y = _data(0)
        sizes = micro_batch_sizes(BATCH, 8)
        stats = stage.train_step(sizes, inputs=split_micro_batches(x, sizes), targets=split_micro_batches(y, sizes))
        results[schedule] = stats
        assert 0.0 <= stats.bubble_fraction <= 1.0
        assert stats.peak_activation_bytes > 0
    # Stage 0 under 1F1B keeps at most P=2 micro-batches in flight, GPipe all 8.
    if comm.rank == 0:
        assert results["1f1b"].peak_activation_bytes < results["gpipe"].peak_activation_bytes


def test_split_points_named_by_user(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    model = _model()
    stage = split_stage(model, comm.rank, 2, split_points=[5])
    expected = list(model)[:5] if comm.rank == 0 else list(model)[5:]
    assert list(stage) == expected
