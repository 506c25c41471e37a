"""Tensor-parallel layers equal dense ones; global-norm clipping and the process grid on real ranks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hpcdl.models import TokenPositionEmbedding, TransformerBlock
from hpcdl.parallel import (ParallelMLP, ParallelTransformerBlock, PipelineStage, ProcessGrid,
                            clip_grad_norm_global, micro_batch_sizes, split_micro_batches, split_stage,
                            sync_replicated_gradients, tensor_parallelize)
from hpcdl.parallel.tensor import _shard_rows

pytestmark = pytest.mark.mpi(min_size=4)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=what)


def test_parallel_mlp_matches_dense(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    parallel = ParallelMLP.from_dense(copy.deepcopy(dense), comm)
    x = torch.randn(5, 3, 8)
    x_dense, x_parallel = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight = torch.randn(5, 3, 8)

    out_dense, out_parallel = dense(x_dense), parallel(x_parallel)
    _close(out_parallel, out_dense, "forward")
    (out_dense * weight).sum().backward()
    (out_parallel * weight).sum().backward()

    _close(x_parallel.grad, x_dense.grad, "input gradient")
    _close(parallel.fc1.weight.grad, dense[0].weight.grad.chunk(2, dim=0)[comm.rank], "fc1 weight")
    _close(parallel.fc1.bias.grad, dense[0].bias.grad.chunk(2, dim=0)[comm.rank], "fc1 bias")
    _close(parallel.fc2.weight.grad, dense[2].weight.grad.chunk(2, dim=1)[comm.rank], "fc2 weight")
    _close(parallel.fc2.bias.grad, dense[2].bias.grad, "fc2 bias (replicated)")


def test_parallel_attention_block_matches_dense(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    torch.manual_seed(2)
    dense = TransformerBlock(16, heads=4)
    parallel = ParallelTransformerBlock.from_dense(copy.deepcopy(dense), comm)
    x = torch.randn(3, 6, 16)
    x_dense, x_parallel = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_dense, out_parallel = dense(x_dense), parallel(x_parallel)
    _close(out_parallel, out_dense, "forward")
    out_dense.pow(2).sum().backward()
    out_parallel.pow(2).sum().backward()

    _close(x_parallel.grad, x_dense.grad, "input gradient")
    _close(parallel.attention.qkv.weight.grad, _shard_rows(dense.qkv.weight.grad, comm, 3), "qkv weight")
    _close(parallel.attention.proj.weight.grad, dense.proj.weight.grad.chunk(2, dim=1)[comm.rank], "proj weight")
    _close(parallel.norm1.weight.grad, dense.norm1.weight.grad, "norm1 weight (replicated)")
    _close(parallel.norm2.bias.grad, dense.norm2.bias.grad, "norm2 bias (replicated)")


def test_replicated_parameters_identical_after_steps(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    torch.manual_seed(3)
    block = ParallelTransformerBlock.from_dense(TransformerBlock(16, heads=4), comm)
    optimizer = torch.optim.Adam(block.parameters(), lr=0.01)
    replicated = [p for p in block.parameters() if not getattr(p, "tensor_parallel", False)]
    for step in range(5):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        block(x).pow(2).mean().backward()
        # Disturb each rank's copy differently, as different reduction orders would.
        for param in replicated:
            param.grad.add_(1e-3 * (comm.rank + 1))
        sync_replicated_gradients(block, comm)
        optimizer.step()
    for param in replicated:
        gathered = comm.allgather(param.detach())
        assert torch.equal(gathered[0], gathered[1])


def test_clip_global_norm_over_shards(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    shard = nn.Parameter(torch.zeros(2))
    shard.tensor_parallel = True
    shard.grad = torch.tensor([3.0, 0.0]) if comm.rank == 0 else torch.tensor([0.0, 4.0])
    norm, scale = clip_grad_norm_global([shard], 1.0, comm, tensor_rank=comm.rank)
    assert norm == pytest.approx(5.0)
    assert scale == pytest.approx(1 / 5, rel=1e-5)
    expected = torch.tensor([0.6, 0.0]) if comm.rank == 0 else torch.tensor([0.0, 0.8])
    _close(shard.grad, expected, "clipped shard")


def test_clip_counts_replicated_parameter_once(subcomms):
    comm = subcomms.get(2)
    if comm is None:
        return
    shard = nn.Parameter(torch.zeros(1))
    shard.tensor_parallel = True
    shard.grad = torch.tensor([3.0 if comm.rank == 0 else 4.0])
    replicated = nn.Parameter(torch.zeros(1))
    replicated.grad = torch.tensor([12.0])  # the same on both ranks
    norm, scale = clip_grad_norm_global([shard, replicated], 1.0, comm, tensor_rank=comm.rank)
    assert norm == pytest.approx(13.0)  # sqrt(9 + 16 + 144), not sqrt(9 + 16 + 2 * 144)
    assert scale == pytest.approx(1 / 13, rel=1e-5)


def test_grid_coordinates(world):
    grid = ProcessGrid.create(world, pipeline_stages=2, tensor_parallel=2)
    assert (grid.data_parallel, grid.data.size, grid.pipeline.size, grid.tensor.size) == (1, 1, 2, 2)
    assert grid.stage == world.rank // 2
    assert grid.tensor_rank == world.rank % 2
    assert grid.model.size == 4

    grid = ProcessGrid.create(world, pipeline_stages=2, tensor_parallel=1)
    assert (grid.data_parallel, grid.data.size, grid.tensor.size) == (2, 2, 1)
    assert grid.stage == world.rank % 2
    assert grid.data_rank == world.rank // 2


def _tiny_transformer() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(TokenPositionEmbedding(16, 8, 16), TransformerBlock(16, 4), TransformerBlock(16, 4),
                         nn.LayerNorm(16), nn.Linear(16, 16))


def _token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def test_pipeline_and_tensor_parallel_match_dense(world):
    grid = ProcessGrid.create(world, pipeline_stages=2, tensor_parallel=2)
    generator = torch.Generator().manual_seed(5)
    x = torch.randint(0, 16, (6, 8), generator=generator)
    y = torch.randint(0, 16, (6, 8), generator=generator)
    dense = _tiny_transformer()
    reference = _token_loss(dense(x), y)
    reference.backward()

    model = _tiny_transformer()
    tensor_parallelize(model, grid.tensor)
    stage = PipelineStage(split_stage(model, grid.stage, 2, split_points=[2]), grid.pipeline,
                          schedule="1f1b", loss_fn=_token_loss)
    stage.negotiate_shapes(x[:1] if grid.is_first_stage else None)
    sizes = micro_batch_sizes(6, 4)
    stats = stage.train_step(sizes, inputs=split_micro_batches(x, sizes), targets=split_micro_batches(y, sizes))
    sync_replicated_gradients(stage.module, grid.tensor)
    loss_sum, samples = world.allreduce_scalars([stats.loss_sum, stats.samples])

    # Both tensor-parallel ranks of the last stage report, which doubles the sum and the count alike.
    assert float(loss_sum / samples) == pytest.approx(float(reference.detach()), rel=1e-5)
    if grid.is_last_stage:
        _close(stage.module[-1].weight.grad, dense[-1].weight.grad, "head weight")
        _close(stage.module[-2].weight.grad, dense[-2].weight.grad, "final norm weight")
    else:
        _close(stage.module[0].token.weight.grad, dense[0].token.weight.grad, "token embedding")
