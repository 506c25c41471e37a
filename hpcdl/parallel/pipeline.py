"""Pipeline parallelism: split an ``nn.Sequential`` into stages and run GPipe or 1F1B schedules.

Activations travel forward and their gradients backward as MPI point-to-point
messages through the buffer methods of ``Communicator`` (no pickle). Each stage
learns the per-sample shape and dtype of the activation it receives once, in
``PipelineStage.negotiate_shapes``. Later messages carry data only, because every
stage computes the micro-batch sizes from the same sample indices.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hpcdl.comm import Communicator
from hpcdl.errors import ConfigError
from hpcdl.parallel.memory import ActivationMeter

SCHEDULES = ("gpipe", "1f1b")

# dtype codes for the shape header; a header is [dtype code, ndim, dims...] as int64.
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]
_MAX_DIMS = 8


def balanced_split_points(model: nn.Sequential, stages: int) -> list[int]:
    """Return the layer indices where stages 1..P-1 start, minimizing the largest stage's parameter count.

    Every stage gets at least one layer. Ties go to the earliest split.

    Raises:
        ConfigError: the model has fewer layers than ``stages``.
    """
    layers = len(model)
    if layers < stages:
        raise ConfigError(f"Invalid pipeline-stages={stages}: the model has only {layers} top-level layers, "
                          f"so at most {layers} stages are possible.")
    counts = [sum(p.numel() for p in layer.parameters()) for layer in model]
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)

    # cost[k][i]: the smallest possible largest stage when layers[:i] form k stages.
    inf = float("inf")
    cost = [[inf] * (layers + 1) for _ in range(stages + 1)]
    choice = [[0] * (layers + 1) for _ in range(stages + 1)]
    cost[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, layers + 1):
            for j in range(k - 1, i):
                candidate = max(cost[k - 1][j], prefix[i] - prefix[j])
                if candidate < cost[k][i]:
                    cost[k][i], choice[k][i] = candidate, j

    points, end = [], layers
    for k in range(stages, 1, -1):
        end = choice[k][end]
        points.append(end)
    return sorted(points)


def parse_split_points(text: str | None, stages: int) -> list[int] | None:
    """Parse ``"2,4"`` into the indices where stages 1..P-1 start; None means balance automatically."""
    if text is None or not text.strip():
        return None
    try:
        points = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"Invalid pipeline-split={text!r}: expected comma-separated layer indices "
                          "such as 2,4.") from None
    if len(points) != stages - 1:
        raise ConfigError(f"Invalid pipeline-split={text!r}: {stages} stages need {stages - 1} split points, "
                          f"got {len(points)}.")
    if any(b <= a for a, b in zip([0] + points, points)):
        raise ConfigError(f"Invalid pipeline-split={text!r}: split points must be increasing and greater "
                          "than 0, so that every stage gets at least one layer.")
    return points


def split_stage(model: nn.Module, stage: int, stages: int, split_points: list[int] | None = None) -> nn.Sequential:
    """Return the layers of ``model`` (an ``nn.Sequential``) that pipeline stage ``stage`` runs.

    Args:
        model: the whole model; its layer objects are reused, not copied.
        stage: 0 to ``stages - 1``.
        stages: the number of pipeline stages P.
        split_points: P-1 indices where stages 1..P-1 start; balanced by
            parameter count when None.

    Raises:
        ConfigError: the model is not an ``nn.Sequential`` or the split points do not fit it.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"Pipeline stages need an nn.Sequential model, got {type(model).__name__}. "
                          "Build the model as nn.Sequential, or run without --pipeline-stages.")
    points = split_points if split_points is not None else balanced_split_points(model, stages)
    if len(points) != stages - 1 or (points and points[-1] >= len(model)):
        raise ConfigError(f"Invalid split points {points} for a model of {len(model)} layers and {stages} stages: "
                          f"give {stages - 1} increasing indices below {len(model)}.")
    bounds = [0, *points, len(model)]
    return nn.Sequential(*list(model)[bounds[stage]:bounds[stage + 1]])


def schedule_ops(schedule: str, stages: int, stage: int, micro_batches: int) -> list[tuple[str, int]]:
    """Return the ordered ("F" | "B", micro-batch) operations of one stage for one step.

    GPipe runs every forward, then every backward. 1F1B first runs P - 1 - stage
    forwards to fill the pipeline, then alternates one forward and one backward.
    So stage s keeps the activations of at most P - s micro-batches instead of M.
    """
    if schedule == "gpipe":
        return [("F", m) for m in range(micro_batches)] + [("B", m) for m in range(micro_batches)]
    if schedule != "1f1b":
        raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    warmup = min(stages - stage - 1, micro_batches)
    ops = [("F", m) for m in range(warmup)]
    for m in range(micro_batches - warmup):
        ops += [("F", warmup + m), ("B", m)]
    ops += [("B", m) for m in range(micro_batches - warmup, micro_batches)]
    return ops


def gpipe_bubble_fraction(stages: int, micro_batches: int) -> float:
    """Return the idealized GPipe bubble fraction (P-1)/(M+P-1)."""
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass
class StepStats:
    """Measurements of one pipelined step on this stage.

    ``loss_sum`` and ``samples`` are non-zero on the last stage only. ``loss_sum``
    is the micro-batch mean loss times the micro-batch size, summed over micro-batches.
    """

    loss_sum: float = 0.0
    samples: int = 0
    step_s: float = 0.0
    idle_s: float = 0.0
    peak_activation_bytes: int = 0

    @property
    def bubble_fraction(self) -> float:
        """Time spent waiting for messages over the step time."""
        return self.idle_s / self.step_s if self.step_s > 0 else 0.0


class PipelineStage:
    """Run one pipeline stage's part of each training step.

    Every stage of a pipeline constructs one with its layers and the pipeline
    communicator (its rank is the stage index), calls ``negotiate_shapes`` once,
    then ``train_step`` with the same micro-batch sizes on every stage.

    Args:
        module: this stage's layers.
        comm: the communicator of the P stages; a duplicate with its own MPI
            context carries the messages.
        schedule: ``gpipe`` or ``1f1b``.
        loss_fn: ``loss_fn(output, target)``, the mean loss of a micro-batch;
            used on the last stage.

    Example:
        >>> stage = PipelineStage(split_stage(model, grid.stage, 2), grid.pipeline, schedule="1f1b",
        ...                       loss_fn=F.cross_entropy)
        >>> stage.negotiate_shapes(x[:1] if grid.is_first_stage else None)
        >>> stats = stage.train_step([4, 4, 2], inputs=x.split(4), targets=y.split(4))
    """

    def __init__(self, module: nn.Module, comm: Communicator, *, schedule: str = "1f1b",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        self.module = module
        self.comm = comm.dup()
        self.stage = comm.rank
        self.stages = comm.size
        self.schedule = schedule
        self.loss_fn = loss_fn
        self.meter = ActivationMeter(module)
        self.input_shape: tuple[int, ...] | None = None
        self.input_dtype: torch.dtype | None = None
        self.output_shape: tuple[int, ...] | None = None
        self.output_dtype: torch.dtype | None = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    # Shapes

    def negotiate_shapes(self, sample: torch.Tensor | None) -> None:
        """Agree on the per-sample activation shape and dtype between neighbouring stages.

        Stage 0 passes one batch of one sample; the other stages pass None. Each
        stage runs that batch through its layers without gradients and sends the
        output's shape and dtype to the next stage, which does the same. The
        layers must map a batch of b samples to an output whose first dimension is b.
        """
        if self.is_first:
            if sample is None:
                raise ValueError("stage 0 needs a sample batch to agree on activation shapes")
            example = sample
        else:
            header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
            self.comm.recv(header, source=self.stage - 1, tag=0)
            ndim = int(header[1])
            self.input_dtype = _DTYPES[int(header[0])]
            self.input_shape = tuple(int(d) for d in header[2:2 + ndim])
            example = torch.zeros((1, *self.input_shape), dtype=self.input_dtype)
        if self.is_last:
            return

        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            output = self.module(example)
        self.module.train(was_training)
        if output.ndim - 1 > _MAX_DIMS or output.dtype not in _DTYPES or output.shape[0] != example.shape[0]:
            raise ValueError(f"stage {self.stage} output of shape {tuple(output.shape)} and dtype {output.dtype} "
                             f"cannot be sent: it needs the batch first, at most {_MAX_DIMS} more dims and one "
                             "of the dtypes float32, float64, float16, bfloat16, int64, int32")
        if not output.is_floating_point():
            raise ValueError(f"stage {self.stage} outputs {output.dtype}, which carries no gradient back; "
                             "move the split point so that every stage but the last ends in a floating-point layer")
        self.output_shape, self.output_dtype = tuple(output.shape[1:]), output.dtype
        header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
        header[0], header[1] = _DTYPES.index(output.dtype), len(self.output_shape)
        header[2:2 + len(self.output_shape)] = torch.tensor(self.output_shape, dtype=torch.int64)
        self.comm.send(header, dest=self.stage + 1, tag=0)

    # Messages

    def _receive(self, shape: tuple[int, ...], dtype: torch.dtype, source: int, tag: int,
                 stats: StepStats) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        request = self.comm.irecv(buffer, source=source, tag=tag)
        started = time.perf_counter()
        request.Wait()
        stats.idle_s += time.perf_counter() - started
        return buffer

    def _send(self, tensor: torch.Tensor, dest: int, tag: int, pending: list) -> None:
        buffer = tensor.detach().contiguous()
        pending.append((self.comm.isend(buffer, dest=dest, tag=tag), buffer))

    # Steps

    def train_step(self, micro_sizes: list[int], *, inputs: list[torch.Tensor] | None = None,
                   targets: list[torch.Tensor] | None = None, weights: list[float] | None = None,
                   no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> StepStats:
        """Run forward and backward of every micro-batch in the schedule's order; accumulate ``.grad``.

        Args:
            micro_sizes: samples in each micro-batch, the same list on every
                stage; every entry must be at least 1.
            inputs: the micro-batches of input, on stage 0.
            targets: the micro-batches of targets, on the last stage.
            weights: the factor of each micro-batch's mean loss in the step's
                loss; ``size / sum(sizes)`` by default, so the gradient is the
                mean over the step's samples.
            no_sync: a context manager factory (a strategy's ``no_sync``) that
                wraps every backward but this stage's last, so a data-parallel
                strategy reduces gradients only once per step.
        """
        assert self.is_first or self.input_shape is not None, "negotiate_shapes() must run first"
        total = sum(micro_sizes)
        weights = weights if weights is not None else [size / total for size in micro_sizes]
        stats = StepStats()
        self.meter.reset_peak()
        started = time.perf_counter()
        ops = schedule_ops(self.schedule, self.stages, self.stage, len(micro_sizes))
        saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending: list = []

        for index, (kind, m) in enumerate(ops):
            if kind == "F":
                saved[m] = self._forward(m, micro_sizes[m], inputs, targets, weights[m], stats, pending)
            else:
                last_backward = index == len(ops) - 1
                context = no_sync() if no_sync is not None and not last_backward else contextlib.nullcontext()
                with context:
                    self._backward(m, micro_sizes[m], saved.pop(m), stats, pending)

        self._wait_sends(pending, stats)
        stats.step_s = time.perf_counter() - started
        stats.peak_activation_bytes = self.meter.peak_bytes
        return stats

    def _forward(self, m: int, size: int, inputs, targets, weight: float, stats: StepStats,
                 pending: list) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.is_first:
            x = inputs[m]
        else:
            x = self._receive((size, *self.input_shape), self.input_dtype, self.stage - 1, 2 * m + 1, stats)
            if x.is_floating_point():
                x.requires_grad_(True)
        with self.meter.hooks():
            output = self.module(x)
            if self.is_last:
                loss = self.loss_fn(output, targets[m])
                stats.loss_sum += float(loss.detach()) * size
                stats.samples += size
                output = loss * weight
        if not self.is_last:
            self._send(output, self.stage + 1, 2 * m + 1, pending)
        return (x if not self.is_first else None), output

    def _backward(self, m: int, size: int, saved: tuple[torch.Tensor | None, torch.Tensor], stats: StepStats,
                  pending: list) -> None:
        x, output = saved
        if self.is_last:
            output.backward()
        else:
            grad = self._receive((size, *self.output_shape), self.output_dtype, self.stage + 1, 2 * m + 2, stats)
            torch.autograd.backward(output, grad)
        if not self.is_first and x is not None and x.grad is not None:
            self._send(x.grad, self.stage - 1, 2 * m + 2, pending)

    def _wait_sends(self, pending: list, stats: StepStats) -> None:
        started = time.perf_counter()
        for request, _buffer in pending:
            request.Wait()
        stats.idle_s += time.perf_counter() - started
        pending.clear()

    @torch.no_grad()
    def forward_only(self, micro_sizes: list[int], inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run the forward pass of every micro-batch; return the outputs on the last stage, [] elsewhere."""
        outputs, pending, stats = [], [], StepStats()
        for m, size in enumerate(micro_sizes):
            if self.is_first:
                x = inputs[m]
            else:
                x = self._receive((size, *self.input_shape), self.input_dtype, self.stage - 1, 2 * m + 1, stats)
            output = self.module(x)
            if self.is_last:
                outputs.append(output)
            else:
                self._send(output, self.stage + 1, 2 * m + 1, pending)
        self._wait_sends(pending, stats)
        return outputs


def micro_batch_sizes(batch_size: int, micro_batches: int) -> list[int]:
    """Split ``batch_size`` samples into at most ``micro_batches`` non-empty parts, like ``torch.tensor_split``.

    Fewer parts come back when the batch has fewer samples than ``micro_batches``,
    and none for an empty batch, so a stage never waits for an empty message.
    """
    base, extra = divmod(batch_size, micro_batches)
    sizes = [base + (1 if i < extra else 0) for i in range(micro_batches)]
    return [size for size in sizes if size > 0]


def split_micro_batches(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split the batch dimension of ``tensor`` into ``sizes``."""
    return list(torch.split(tensor, sizes)) if sizes else []
