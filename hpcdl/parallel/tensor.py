"""Tensor-parallel layers: column- and row-parallel linear layers, and MLP and attention blocks.

The layers follow the Megatron-LM split (Shoeybi et al., 2019, arXiv:1909.08053).
A column-parallel layer contains a slice of the output features and a row-parallel
layer a slice of the input features, so a column-parallel layer followed by a
row-parallel one needs one all-reduce in forward and one in backward. The
all-reduces are autograd functions over the MPI communicator of the
tensor-parallel group.

Parameters split across the group carry the attribute ``tensor_parallel = True``.
Every other parameter (norms, the row-parallel bias, embeddings) is replicated on
each rank of the group; ``sync_replicated_gradients`` averages their gradients so
the replicas stay identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcdl.comm import Communicator


def _allreduce_copy(tensor: torch.Tensor, comm: Communicator) -> torch.Tensor:
    out = tensor.detach().contiguous().clone()
    comm.allreduce(out, algorithm="mpi")
    return out


class CopyToTensorParallel(torch.autograd.Function):
    """Identity in forward; sums the gradient over the group in backward.

    Placed where a replicated activation enters column-parallel layers, because
    each rank's gradient for it covers only that rank's output features.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _allreduce_copy(grad, ctx.comm), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Sums partial outputs over the group in forward; identity in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return _allreduce_copy(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _shard_rows(weight: torch.Tensor, comm: Communicator, chunks: int) -> torch.Tensor:
    """Take this rank's slice of dim 0 from each of ``chunks`` equal blocks, concatenated."""
    blocks = weight.chunk(chunks, dim=0)
    return torch.cat([block.chunk(comm.size, dim=0)[comm.rank] for block in blocks], dim=0)


def _check_divisible(name: str, value: int, comm: Communicator) -> None:
    if value % comm.size:
        raise ValueError(f"{name}={value} is not divisible by the tensor-parallel size {comm.size}; "
                         f"choose sizes that are multiples of {comm.size}")


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with the rows of A (the output features) split across the group.

    Input ``(..., in_features)`` is replicated; output ``(..., out_features / T)``
    is this rank's slice.

    Args:
        in_features: input features.
        out_features: output features of the whole layer, a multiple of T.
        comm: the tensor-parallel communicator.
        bias: add a (sharded) bias.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, *, bias: bool = True) -> None:
        super().__init__()
        _check_divisible("out_features", out_features, comm)
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(out_features // comm.size, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // comm.size)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        for param in self.parameters():
            param.tensor_parallel = True

    @classmethod
    def from_dense(cls, linear: nn.Linear, comm: Communicator, *, chunks: int = 1) -> ColumnParallelLinear:
        """Shard a dense ``nn.Linear``; ``chunks`` > 1 shards each of that many output blocks (q, k, v)."""
        _check_divisible("out_features / chunks", linear.out_features // chunks, comm)
        layer = cls(linear.in_features, linear.out_features, comm, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(_shard_rows(linear.weight, comm, chunks))
            if linear.bias is not None:
                layer.bias.copy_(_shard_rows(linear.bias, comm, chunks))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(CopyToTensorParallel.apply(x, self.comm), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with the columns of A (the input features) split across the group.

    Input ``(..., in_features / T)`` is this rank's slice, as a column-parallel
    layer produces it; output ``(..., out_features)`` is the sum over the group,
    replicated. The bias is replicated and added once, after the sum.
    """

    def __init__(self, in_features: int, out_features: int, comm: Communicator, *, bias: bool = True) -> None:
        super().__init__()
        _check_divisible("in_features", in_features, comm)
        self.comm = comm
        self.weight = nn.Parameter(torch.empty(out_features, in_features // comm.size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.weight.tensor_parallel = True
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, comm: Communicator) -> RowParallelLinear:
        """Shard a dense ``nn.Linear`` by input features."""
        layer = cls(linear.in_features, linear.out_features, comm, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(linear.weight.chunk(comm.size, dim=1)[comm.rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ReduceFromTensorParallel.apply(F.linear(x, self.weight), self.comm)
        return y + self.bias if self.bias is not None else y


class ParallelMLP(nn.Module):
    """Column-parallel linear, GELU, row-parallel linear: ``(..., d_model) -> (..., d_model)``."""

    def __init__(self, d_model: int, hidden: int, comm: Communicator) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, hidden, comm)
        self.fc2 = RowParallelLinear(hidden, d_model, comm)

    @classmethod
    def from_dense(cls, mlp: nn.Sequential, comm: Communicator) -> ParallelMLP:
        """Shard ``nn.Sequential(nn.Linear, nn.GELU, nn.Linear)``."""
        first, _, second = mlp
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.fc1 = ColumnParallelLinear.from_dense(first, comm)
        block.fc2 = RowParallelLinear.from_dense(second, comm)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ParallelSelfAttention(nn.Module):
    """Causal multi-head self-attention with the heads split across the group.

    Each rank computes ``heads / T`` heads from its slice of the q, k and v
    projections; the output projection is row-parallel.
    """

    def __init__(self, d_model: int, heads: int, comm: Communicator) -> None:
        super().__init__()
        _check_divisible("heads", heads, comm)
        self.local_heads = heads // comm.size
        self.local_width = d_model // comm.size
        self.qkv = ColumnParallelLinear(d_model, 3 * d_model, comm)
        self.proj = RowParallelLinear(d_model, d_model, comm)

    @classmethod
    def from_dense(cls, qkv: nn.Linear, proj: nn.Linear, heads: int, comm: Communicator) -> ParallelSelfAttention:
        """Shard dense q/k/v (one ``nn.Linear`` to ``3 * d_model``, in that order) and output projections."""
        block = cls(proj.in_features, heads, comm)
        block.qkv = ColumnParallelLinear.from_dense(qkv, comm, chunks=3)
        block.proj = RowParallelLinear.from_dense(proj, comm)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.local_width, dim=2)
        # (B, T, width) -> (B, local heads, T, head_dim)
        q, k, v = (t.view(batch, length, self.local_heads, -1).transpose(1, 2) for t in (q, k, v))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attention.transpose(1, 2).reshape(batch, length, self.local_width))


class ParallelTransformerBlock(nn.Module):
    """The tensor-parallel form of ``hpcdl.models.TransformerBlock``: replicated norms, split attention and MLP."""

    def __init__(self, norm1: nn.LayerNorm, attention: ParallelSelfAttention, norm2: nn.LayerNorm,
                 mlp: ParallelMLP) -> None:
        super().__init__()
        self.norm1, self.attention, self.norm2, self.mlp = norm1, attention, norm2, mlp

    @classmethod
    def from_dense(cls, block: nn.Module, comm: Communicator) -> ParallelTransformerBlock:
        """Shard a ``TransformerBlock``; the norms are copied and stay replicated."""
        attention = ParallelSelfAttention.from_dense(block.qkv, block.proj, block.heads, comm)
        mlp = ParallelMLP.from_dense(block.mlp, comm)
        return cls(block.norm1, attention, block.norm2, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tensor_parallelize(model: nn.Sequential, comm: Communicator) -> int:
    """Replace every ``TransformerBlock`` layer of ``model`` in place by its tensor-parallel form.

    Returns the number of layers replaced. Other layers stay replicated.
    """
    from hpcdl.models import TransformerBlock

    replaced = 0
    for index, layer in enumerate(model):
        if isinstance(layer, TransformerBlock):
            model[index] = ParallelTransformerBlock.from_dense(layer, comm)
            replaced += 1
    return replaced


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Return True for a parameter split across the tensor-parallel group."""
    return bool(getattr(param, "tensor_parallel", False))


def sync_replicated_gradients(module: nn.Module, comm: Communicator) -> None:
    """Average the gradients of replicated parameters over the tensor-parallel group, in one flat buffer."""
    if comm.size == 1:
        return
    params = [p for p in module.parameters() if p.grad is not None and not is_tensor_parallel(p)]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    comm.allreduce(flat, algorithm="mpi", average=True)
    offset = 0
    for param in params:
        count = param.grad.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
        offset += count
