"""Gradient fusion buckets reduced while backward is still running."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
from mpi4py import MPI

log = logging.getLogger(__name__)

ReduceFn = Callable[[int, torch.Tensor], None]


class _Bucket:
    def __init__(self, index: int, params: list[torch.nn.Parameter], dtype: torch.dtype) -> None:
        self.index = index
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.buffer = torch.zeros(sum(self.sizes), dtype=dtype)
        self.ready: set[int] = set()
        self.launched = False
        self.future: Future | None = None


class GradientBuckets:
    """Fuse gradients into flat buckets and reduce each as soon as backward fills it.

    Parameters go into buckets of about ``bucket_bytes`` in reverse registration
    order, which approximates the order backward produces their gradients. A
    post-accumulate-grad hook on each parameter marks it ready. When a bucket is
    complete its gradients are copied into the bucket's flat buffer, scaled by
    this rank's sample weight, and handed to ``reduce_fn`` on a background
    thread, so communication overlaps the rest of backward.

    Buckets are always reduced in index order, so every rank issues the same
    sequence of collectives whatever order its hooks fire in. ``flush`` launches
    any bucket whose parameters got no gradient this step (treated as zeros),
    waits for all reductions, and writes the results back into ``param.grad``.

    Args:
        params: parameters that receive gradients, in the same order on every rank.
        reduce_fn: ``reduce_fn(bucket_index, flat)`` sums ``flat`` in place across ranks.
        bucket_bytes: target bucket size in bytes.
        enabled: returns False inside ``no_sync``; hooks then do nothing.
        overlap: reduce on a background thread; needs MPI_THREAD_MULTIPLE.
    """

    def __init__(self, params: list[torch.nn.Parameter], reduce_fn: ReduceFn, *,
                 bucket_bytes: int, enabled: Callable[[], bool], overlap: bool = True) -> None:
        self.reduce_fn = reduce_fn
        self.enabled = enabled
        self.weight = 1.0
        self.buckets = self._build(params, bucket_bytes)
        self._where = {id(p): (b, i) for b in self.buckets for i, p in enumerate(b.params)}
        self._next = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in params]
        overlap = overlap and MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcdl-reduce") if overlap else None

    @staticmethod
    def _build(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []
        current_bytes = 0
        for param in reversed(params):
            same_dtype = not current or current[0].dtype == param.dtype
            if current and (current_bytes >= bucket_bytes or not same_dtype):
                buckets.append(_Bucket(len(buckets), current, current[0].dtype))
                current, current_bytes = [], 0
            current.append(param)
            current_bytes += param.numel() * param.element_size()
        if current:
            buckets.append(_Bucket(len(buckets), current, current[0].dtype))
        return buckets

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self.enabled():
            return
        bucket, position = self._where[id(param)]
        if bucket.launched:
            return
        bucket.ready.add(position)
        if len(bucket.ready) == len(bucket.params):
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        offset = 0
        for param, size in zip(bucket.params, bucket.sizes):
            target = bucket.buffer[offset:offset + size]
            if param.grad is None:
                target.zero_()
            else:
                target.copy_(param.grad.reshape(-1)).mul_(self.weight)
            offset += size
        bucket.launched = True
        if self._executor is None:
            self.reduce_fn(bucket.index, bucket.buffer)
        else:
            bucket.future = self._executor.submit(self.reduce_fn, bucket.index, bucket.buffer)

    def flush(self) -> None:
        """Launch what is left, wait for every reduction, and write gradients back."""
        self._launch_ready(force=True)
        for bucket in self.buckets:
            if bucket.future is not None:
                bucket.future.result()
            offset = 0
            for param, size in zip(bucket.params, bucket.sizes):
                reduced = bucket.buffer[offset:offset + size].view_as(param)
                if param.grad is None:
                    param.grad = reduced.clone()
                else:
                    param.grad.copy_(reduced)
                offset += size
            bucket.ready.clear()
            bucket.launched = False
            bucket.future = None
        self._next = 0

    def close(self) -> None:
        """Remove the hooks and stop the background thread."""
        for handle in self._handles:
            handle.remove()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
