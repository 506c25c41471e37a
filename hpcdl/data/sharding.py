"""Deterministic sharding of global batches across MPI ranks.

With ``world_size`` ranks and a per-rank batch size ``B``, global batch ``t``
of an epoch is ``perm[t*N*B : (t+1)*N*B]`` for ``N = world_size``, split in
order across ranks. The union of the rank shards at a step is therefore exactly
the batch that one process with batch size ``N*B`` would draw at that step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class GlobalBatchSampler:
    """Deterministic per-step sharding of one global batch across ranks.

    Each epoch draws ``torch.randperm(num_samples)`` from a generator seeded
    with ``seed + epoch`` (the identity order when ``shuffle`` is False). A
    full global batch gives ``batch_size`` indices to each rank. The short last
    batch is split like ``numpy.array_split``: lower ranks get one extra index
    and a rank may get none. Every sample is used exactly once per epoch, except
    that ``drop_last=True`` skips the short last batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} is negative; pass the dataset length")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid; use a per-rank batch size >= 1")
        if world_size < 1:
            raise ValueError(f"world_size={world_size} is invalid; use the number of ranks (>= 1)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..{world_size - 1}; pass this process's MPI rank")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._cached_epoch: int | None = None
        self._cached_order: torch.Tensor | None = None

    @property
    def global_batch_size(self) -> int:
        """Samples per step summed over all ranks."""
        return self.batch_size * self.world_size

    def samples_in_step(self, step: int) -> int:
        """Return the samples all ranks together hold at ``step`` of an epoch.

        Equal to ``global_batch_size`` except on the short last step, and
        computed without communication.
        """
        return max(0, min(self.global_batch_size, self.num_samples - step * self.global_batch_size))

    def steps_per_epoch(self) -> int:
        """Return the number of steps in each epoch, which is the same on every rank."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Return the sample order of ``epoch`` for all ranks: a permutation, or arange without shuffle."""
        if self._cached_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.arange(self.num_samples)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order

    def indices(self, epoch: int, step: int) -> torch.Tensor:
        """Return this rank's sample indices (int64, possibly empty) for ``step`` of ``epoch``.

        Raises:
            IndexError: ``step`` is outside ``0..steps_per_epoch() - 1``.
        """
        steps = self.steps_per_epoch()
        if not 0 <= step < steps:
            raise IndexError(f"step={step} is outside 0..{steps - 1} for this sampler")
        start = step * self.global_batch_size
        global_batch = self.epoch_order(epoch)[start : start + self.global_batch_size]

        # numpy.array_split sizes: the first `extra` ranks get one more sample.
        base, extra = divmod(len(global_batch), self.world_size)
        offset = self.rank * base + min(self.rank, extra)
        size = base + (1 if self.rank < extra else 0)
        return global_batch[offset : offset + size]


def shard(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield this rank's ``(x, y)`` batch for every step of one epoch.

    Pass a dataset's tensors, for example ``shard(ds.x_train, ds.y_train, ...)``.
    The batches follow ``GlobalBatchSampler`` with the same arguments, so all
    ranks yield the same number of batches. A rank's batch may be empty on the
    short last step, and the caller must still join that step's collective
    operations (and skip a loss that would be the mean of zero samples).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}; pass matching tensors")
    sampler = GlobalBatchSampler(len(x), batch_size, rank, world_size, seed, shuffle, drop_last)
    for step in range(sampler.steps_per_epoch()):
        index = sampler.indices(epoch, step)
        yield x[index], y[index]
