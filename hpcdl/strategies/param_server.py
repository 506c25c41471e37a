"""Training through parameter-server ranks: ``async``, ``ssp`` and ``bsp-ps``."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from hpcdl.comm import Communicator
from hpcdl.compression import Compressor, build_compressor
from hpcdl.config import parse_push_delay
from hpcdl.ps import protocol as p
from hpcdl.ps.client import PSClient
from hpcdl.ps.layout import PSLayout, current_layout
from hpcdl.specs import Spec
from hpcdl.strategies.base import Strategy

log = logging.getLogger(__name__)


class ParameterServerStrategy(Strategy):
    """Push each step's gradient to the server shards and pull the parameters they return.

    The local optimizer is not stepped: each shard runs the server-side optimizer
    (the run's ``--optimizer``, ``--momentum``, ``--weight-decay``) with the
    learning rate the worker sends, so LR schedules still apply.

    Modes:
        ``async``: every push is applied on arrival with the full learning rate.
            Workers never wait for each other: the run ends when the shards
            have applied ``steps x workers`` pushes, however they were shared
            out, so a slow worker does fewer steps and a lost one is not waited for.
        ``ssp``: every push is applied on arrival, weighted by the worker's share
            of the step's samples (about 1/W). With plain SGD, one clock of pushes
            from all W workers then equals one synchronous step. A pull waits
            while the worker's clock is more than ``staleness`` ahead of the
            slowest unfinished worker.
        ``bsp``: the shard sums the weighted pushes of one clock from every
            worker and applies them in one step, which equals ``allreduce``.

    Args:
        comm: the communicator over the workers.
        layout: server and worker ranks; the layout of this process by default.
        mode: ``async``, ``ssp`` or ``bsp``.
        staleness: the ``ssp`` bound in clocks.
        staleness_lr: in ``async``, the shard divides the learning rate by each
            push's staleness.
        timeout_s: how long a worker waits for a shard's reply, in seconds.
        push_delay: ``(worker rank, seconds)``: that worker sleeps before each
            push. A fault-injection aid for tests.
        compressor: encodes each push, per shard, with error feedback on the
            worker; the shards decode it with the same spec.
    """

    name = "param-server"
    compresses_pushes = True

    def __init__(self, comm: Communicator, *, mode: str, staleness: int = 0, staleness_lr: bool = False,
                 layout: PSLayout | None = None, timeout_s: float = 120.0,
                 push_delay: tuple[int, float] | None = None,
                 compressor: Compressor | None = None) -> None:
        super().__init__(comm, compressor=compressor)
        layout = layout or current_layout()
        if layout is None:
            raise RuntimeError(f"strategy {mode!r} needs parameter-server ranks; run it with 'hpcdl train' "
                               "or create them with hpcdl.ps.layout.create_layout")
        self.layout = layout
        self.mode = mode
        self.staleness = staleness
        self.staleness_lr = staleness_lr
        self.timeout_s = timeout_s
        self.client: PSClient | None = None
        self.flat_params: torch.Tensor | None = None
        self.flat_grad: torch.Tensor | None = None
        self.clock = 0
        self.weight = 1.0 / comm.size
        self.finished = False
        self.final_metrics: dict[str, float] = {}
        self.push_delay = push_delay
        # In async the trainer keeps workers apart: no collective between them
        # after set-up, so a slow or lost worker does not hold the others back.
        self.independent_workers = mode == "async"

    @classmethod
    def from_spec(cls, spec: Spec, comm: Communicator, **options: Any) -> ParameterServerStrategy:
        mode = {"async": "async", "ssp": "ssp", "bsp-ps": "bsp"}[spec.name]
        return cls(comm, mode=mode, staleness=int(spec.params.get("staleness", 0)),
                   layout=options.get("ps_layout"),
                   staleness_lr=bool(spec.params.get("staleness_lr", False)),
                   # Longer than the server's own timeout, so that the server's error,
                   # which names the silent worker, ends the job first.
                   timeout_s=2 * float(options.get("ps_timeout_s", 120.0)) + 60.0,
                   push_delay=parse_push_delay(options.get("push_delay")),
                   compressor=build_compressor(options.get("compression")))

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().attach(model, optimizer)
        params = list(model.parameters())
        bad = [f"{tuple(q.shape)}:{q.dtype}" for q in params if q.dtype != p.PAYLOAD_DTYPE]
        if bad:
            raise ValueError(f"the parameter server stores float32 parameters only; the model has {bad}")
        self.flat_params = torch.cat([q.detach().reshape(-1) for q in params]).contiguous()
        self.flat_grad = torch.zeros_like(self.flat_params)
        self.client = PSClient(self.layout.comm, self.layout.server_ranks, self.flat_params.numel(),
                               timeout_s=self.timeout_s, compressor=self.compressor,
                               shapes=[tuple(q.shape) for q in params])
        if self.comm.rank == 0:
            self.client.init(self.flat_params)
        # No worker may push before every shard has its initial parameters.
        self.comm.barrier()

    def begin_step(self, local_samples: int, global_samples: int | None = None) -> None:
        if global_samples is not None and global_samples > 0:
            self.weight = local_samples / global_samples
        else:
            self.weight = 1.0 / self.comm.size

    def step(self, closure=None) -> Any:
        """Transform the local gradient, push it, and load the parameters the shards return."""
        assert self.client is not None, "attach() must run first"
        if self.push_delay is not None and self.push_delay[0] == self.comm.rank:
            time.sleep(self.push_delay[1])
        self._gather_grad()
        self._transform_local_grad()
        if self.mode != "async":
            self.flat_grad.mul_(self.weight)
        self.clock += 1
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.client.push_pull(self.flat_grad, self.flat_params, self.clock, lr)
        self._scatter_params()
        self.steps += 1
        return None

    def _gather_grad(self) -> None:
        offset = 0
        for param in self.model.parameters():
            n = param.numel()
            if param.grad is None:
                self.flat_grad[offset:offset + n].zero_()
            else:
                self.flat_grad[offset:offset + n].copy_(param.grad.reshape(-1))
            offset += n

    def _transform_local_grad(self) -> None:
        """Zero a non-finite gradient and clip the rest, using only this worker's gradient.

        The shared gradient transforms agree on every step in an all-reduce over
        the workers, which would make the workers wait for each other. Here a
        non-finite gradient is replaced by zeros, so that the worker's clock still
        advances in ``ssp`` and ``bsp``, and the step counts as skipped.
        """
        norm = float(torch.linalg.vector_norm(self.flat_grad))
        if not math.isfinite(norm):
            self.flat_grad.zero_()
            self.skipped_steps += 1
            log.warning("non-finite gradient at step %d: pushing zeros instead", self.steps + self.skipped_steps)
            return
        transforms = getattr(self.grad_transform, "__self__", None)
        clip_norm = getattr(transforms, "clip_norm", None)
        if clip_norm is not None and norm > clip_norm:
            self.flat_grad.mul_(clip_norm / (norm + 1e-6))

    def _scatter_params(self) -> None:
        offset = 0
        with torch.no_grad():
            for param in self.model.parameters():
                n = param.numel()
                param.copy_(self.flat_params[offset:offset + n].view_as(param))
                offset += n

    def progress_steps(self) -> int | None:
        """In ``async``, the run's progress in steps: shard 0's pushes divided by the workers.

        Returns None in the other modes, where every worker counts its own steps.
        """
        if not self.independent_workers or self.client is None:
            return None
        return self.client.versions[0] // len(self.layout.worker_ranks)

    def finish(self) -> None:
        """Tell the shards this worker is done, and load the final parameters they return.

        The shards reply once every worker still alive is done, so every worker
        ends with the same parameters without a collective between them.
        """
        if self.finished:
            return
        stats = self.client.finish(self.flat_params)
        self._scatter_params()
        self.final_metrics = self._summarize(stats)
        self.finished = True
        if not self.independent_workers:
            # Buffers (BatchNorm statistics) are not served; copy worker 0's.
            for buffer in self.model.buffers():
                self.comm.broadcast(buffer.data, root=0)

    def metrics(self) -> dict[str, float]:
        return self.server_metrics()

    def server_metrics(self) -> dict[str, float]:
        """Return staleness statistics and pushes per second from the shards (worker 0 only, else {}).

        Keys: ``staleness_mean``, ``staleness_p50``, ``staleness_p99``,
        ``staleness_max`` (updates applied between a worker's pull and its push),
        ``clock_gap_max`` (a worker's clock minus the slowest worker's when its pull
        was released), ``pushes`` and ``pushes_per_s`` (shard 0's counters),
        ``ps_bytes_received`` (request bytes all shards received from workers)
        and ``lost_workers`` (``async`` workers that went silent and were left behind).
        """
        if self.finished:
            return dict(self.final_metrics)
        if self.comm.rank != 0 or self.client is None:
            return {}
        return self._summarize(self.client.stats())

    @staticmethod
    def _summarize(stats: list[torch.Tensor]) -> dict[str, float]:
        bins, first_bin = p.HISTOGRAM_BINS, p.STATS_SCALARS
        staleness = sum(s[first_bin:first_bin + bins] for s in stats)
        clock_gap = sum(s[first_bin + bins:first_bin + 2 * bins] for s in stats)
        first = stats[0]
        out = {f"staleness_{k}": v for k, v in p.histogram_stats(staleness).items()}
        out["clock_gap_max"] = p.histogram_stats(clock_gap)["max"]
        out["ps_ranks"] = len(stats)
        pushes, span_s = float(first[p.S_PUSHES]), float(first[p.S_ELAPSED_S])
        out["pushes"] = int(pushes)
        out["pushes_per_s"] = (pushes - 1) / span_s if span_s > 0 else 0.0
        out["rejected_requests"] = int(sum(float(s[p.S_REJECTED]) for s in stats))
        out["ps_bytes_received"] = int(sum(float(s[p.S_BYTES_RECEIVED]) for s in stats))
        out["lost_workers"] = int(max(float(s[p.S_LOST_WORKERS]) for s in stats))
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["clock"] = self.clock
        state["versions"] = list(self.client.versions) if self.client else []
        if self.comm.rank == 0 and self.client is not None:
            state["server"] = self.client.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.clock = int(state.get("clock", 0))
        if self.client is not None and state.get("versions"):
            self.client.versions = [int(v) for v in state["versions"]]
        if self.comm.rank == 0 and self.client is not None and "server" in state:
            # Every worker resumes at the checkpoint's clock, whatever clocks the
            # shards had recorded for workers that ran ahead.
            for shard in state["server"]:
                shard["meta"]["clocks"] = {str(w): self.clock for w in self.layout.worker_ranks}
            self.client.set_state(state["server"])
        self.comm.barrier()
