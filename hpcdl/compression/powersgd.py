"""PowerSGD: rank-K approximation of each matrix-shaped gradient."""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, Sequence

import torch

from hpcdl.comm import Communicator
from hpcdl.compression.base import Compressor, Shapes

log = logging.getLogger(__name__)


def _views(flat: torch.Tensor, shapes: Shapes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split ``flat`` into 2-D views of its matrix-shaped tensors and 1-D views of the rest."""
    if shapes is None:
        return [], [flat]
    matrices, vectors = [], []
    offset = 0
    for shape in shapes:
        size = math.prod(shape)
        view = flat[offset:offset + size]
        if len(shape) >= 2 and shape[0] > 1 and size // shape[0] > 1:
            matrices.append(view.view(shape[0], -1))
        else:
            vectors.append(view)
        offset += size
    if offset != flat.numel():
        raise ValueError(f"shapes cover {offset} elements, but the tensor has {flat.numel()}")
    return matrices, vectors


class PowerSGDCompressor(Compressor):
    """Approximate each matrix M (n x m) by ``P Q^T`` of rank K with one power iteration.

    Per step and matrix, with the Q of the previous step as a warm start
    (Vogels et al., "PowerSGD: Practical Low-Rank Gradient Compression for
    Distributed Optimization", NeurIPS 2019, Algorithm 1):
    ``P = all-reduce(M Q)``, P orthonormalized by a QR decomposition,
    ``Q = all-reduce(M^T P)``, and the sum over ranks is ``P Q^T``. All P
    factors of a call travel in one all-reduce and all Q factors in another, so
    a step sends ``K (n + m)`` floats per matrix instead of ``n m``. Tensors
    with fewer than 2 dimensions (biases, norms) are summed uncompressed, and a
    call with no matrices makes no low-rank collective. Tensors with more than 2
    dimensions are flattened to ``shape[0] x rest``. K is capped at
    ``min(n, m)``, where the approximation is exact.

    Low-rank approximation is biased, so error feedback is on unless ``ef=false``.
    The warm-start Q factors are the same on every rank and are checkpointed.

    Args:
        rank: the approximation rank K, at least 1.
        seed: seed of the initial Q factors, shared by all ranks.
        ef: keep error-feedback residuals; on by default.
    """

    name = "powersgd"
    biased = True

    def __init__(self, rank: int, *, seed: int = 0, ef: bool | None = None) -> None:
        super().__init__(ef=ef)
        if rank < 1:
            raise ValueError(f"powersgd rank must be at least 1, got {rank}")
        self.rank = rank
        self.seed = seed
        self.q_factors: dict[str, torch.Tensor] = {}
        self._warned_flat = False

    def allreduce(self, key: str, flat: torch.Tensor, comm: Communicator, *,
                  algorithm: str = "auto", shapes: Shapes = None) -> None:
        if shapes is None and not self._warned_flat:
            log.warning("powersgd received %r without tensor shapes, so it is summed uncompressed; "
                        "pass shapes= to compress its matrices", key)
            self._warned_flat = True
        matrices, vectors = _views(flat, shapes)
        if vectors:
            joined = torch.cat(vectors) if len(vectors) > 1 else vectors[0].clone()
            comm.allreduce(joined, algorithm=algorithm)
            _scatter(joined, vectors)
        if matrices:
            self.allreduce_matrices(key, matrices, comm, algorithm=algorithm)

    def allreduce_matrices(self, key: str, matrices: Sequence[torch.Tensor], comm: Communicator, *,
                           algorithm: str = "auto") -> None:
        """Replace each 2-D tensor in place with the rank-K approximation of its sum over ranks.

        The tensors may be non-contiguous or transposed views; results are
        written back through them.
        """
        keys = [f"{key}/{i}" for i in range(len(matrices))]
        corrected = [self._compensate(k, m) for k, m in zip(keys, matrices)]
        q_factors = [self._q_factor(k, m) for k, m in zip(keys, corrected)]

        p_factors = [m @ q for m, q in zip(corrected, q_factors)]
        _allreduce_all(p_factors, comm, algorithm)
        p_factors = [torch.linalg.qr(p, mode="reduced").Q for p in p_factors]

        local_q = [m.T @ p for m, p in zip(corrected, p_factors)]
        summed_q = [q.clone() for q in local_q]
        _allreduce_all(summed_q, comm, algorithm)

        for k, matrix, m, p, q_local, q_sum in zip(keys, matrices, corrected, p_factors, local_q, summed_q):
            if self.feedback is not None:
                self.feedback.update(k, m, p @ q_local.T)
            matrix.copy_(p @ q_sum.T)
            self.q_factors[k] = q_sum

    def encode(self, key: str, flat: torch.Tensor, *, shapes: Shapes = None) -> list[torch.Tensor]:
        """Return ``[P factors, Q factors, 1-D tensors]``, each flattened, for one rank's tensor."""
        matrices, vectors = _views(flat.detach().to(torch.float32), shapes)
        p_parts, q_parts = [], []
        for i, matrix in enumerate(matrices):
            k = f"{key}/{i}"
            m = self._compensate(k, matrix)
            p = torch.linalg.qr(m @ self._q_factor(k, m), mode="reduced").Q
            q = m.T @ p
            if self.feedback is not None:
                self.feedback.update(k, m, p @ q.T)
            self.q_factors[k] = q
            p_parts.append(p.reshape(-1))
            q_parts.append(q.reshape(-1))
        return [_cat(p_parts), _cat(q_parts), _cat([v.reshape(-1) for v in vectors])]

    def decode(self, key: str, payload: Sequence[torch.Tensor], numel: int, *,
               shapes: Shapes = None) -> torch.Tensor:
        out = torch.zeros(numel, dtype=torch.float32)
        matrices, vectors = _views(out, shapes)
        p_flat, q_flat, v_flat = payload
        p_offset = q_offset = 0
        for matrix in matrices:
            n, m = matrix.shape
            k = min(self.rank, n, m)
            p = p_flat[p_offset:p_offset + n * k].view(n, k)
            q = q_flat[q_offset:q_offset + m * k].view(m, k)
            matrix.copy_(p @ q.T)
            p_offset += n * k
            q_offset += m * k
        _scatter(v_flat.to(torch.float32), vectors)
        return out

    def payload_layout(self, numel: int, *, shapes: Shapes = None) -> list[tuple[torch.dtype, int]]:
        matrices, vectors = _views(torch.empty(numel), shapes)
        p_count = sum(m.shape[0] * min(self.rank, *m.shape) for m in matrices)
        q_count = sum(m.shape[1] * min(self.rank, *m.shape) for m in matrices)
        return [(torch.float32, p_count), (torch.float32, q_count),
                (torch.float32, sum(v.numel() for v in vectors))]

    def _compensate(self, key: str, matrix: torch.Tensor) -> torch.Tensor:
        if self.feedback is None:
            return matrix.detach().to(torch.float32, copy=True)
        return self.feedback.compensate(key, matrix)

    def _q_factor(self, key: str, matrix: torch.Tensor) -> torch.Tensor:
        n, m = matrix.shape
        k = min(self.rank, n, m)
        q = self.q_factors.get(key)
        if q is None or q.shape != (m, k):
            # The same seed on every rank gives the same first Q everywhere.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            q = torch.randn(m, k, generator=generator)
        return q

    def _extra_state(self) -> dict[str, Any]:
        return {"q_factors": {k: q.clone() for k, q in self.q_factors.items()}}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.q_factors = {k: q.to(torch.float32).clone() for k, q in state.get("q_factors", {}).items()}


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.float32)


def _scatter(joined: torch.Tensor, views: Sequence[torch.Tensor]) -> None:
    offset = 0
    for view in views:
        view.copy_(joined[offset:offset + view.numel()].view_as(view))
        offset += view.numel()


def _allreduce_all(factors: list[torch.Tensor], comm: Communicator, algorithm: str) -> None:
    """Sum every factor across ranks with one all-reduce of their concatenation."""
    joined = torch.cat([f.reshape(-1) for f in factors])
    comm.allreduce(joined, algorithm=algorithm)
    _scatter(joined, factors)
