"""The per-rank training loop for pipeline- and tensor-parallel runs on a process grid."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from hpcdl.api import init
from hpcdl.config import TrainConfig, parse_fail_at, replace
from hpcdl.data import GlobalBatchSampler, load_dataset
from hpcdl.metrics import MetricsWriter, Progress, write_summary
from hpcdl.models import build_model, count_correct, loss_function
from hpcdl.optim import build_optimizer, learning_rate, set_learning_rate
from hpcdl.parallel.clip import clip_grad_norm_global
from hpcdl.parallel.grid import ProcessGrid
from hpcdl.parallel.pipeline import (PipelineStage, gpipe_bubble_fraction, micro_batch_sizes, parse_split_points,
                                     split_micro_batches, split_stage)
from hpcdl.parallel.tensor import sync_replicated_gradients, tensor_parallelize
from hpcdl.strategies import build_strategy
from hpcdl.trainer import InjectedFailure, default_run_dir

log = logging.getLogger(__name__)


class ParallelTrainer:
    """Train one pipeline stage and tensor-parallel shard of the model on this rank.

    The world is a D x P x T grid (``ProcessGrid``). The ranks of one
    data-parallel replica draw the same sample indices; stage 0 feeds the inputs,
    the last stage computes the loss. The data-parallel strategy reduces each
    shard's gradients over the D ranks that hold the same shard. Rank 0 writes
    the run directory.

    Args:
        config: a validated config with ``pipeline_stages`` or ``tensor_parallel`` above 1.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        ctx = init(ranks_per_node=config.ranks_per_node)
        self.comm = ctx.comm
        self.is_root = self.comm.rank == 0
        self.grid = ProcessGrid.create(self.comm, pipeline_stages=config.pipeline_stages,
                                       tensor_parallel=config.tensor_parallel)
        self.fail_at = parse_fail_at(config.fail_at)
        self.run_dir = self._prepare_run_dir()

        torch.manual_seed(config.seed)
        self.data = load_dataset(config.dataset, seed=config.seed)
        # Every rank builds the whole model from the same seed, then keeps its shard.
        full = build_model(config.model, self.data, hidden=config.hidden)
        if config.tensor_parallel > 1:
            tensor_parallelize(full, self.grid.tensor)
        split_points = parse_split_points(config.pipeline_split, config.pipeline_stages)
        module = split_stage(full, self.grid.stage, config.pipeline_stages, split_points)
        self.loss_fn = loss_function(self.data.task)
        self.stage = PipelineStage(module, self.grid.pipeline, schedule=config.pipeline_schedule,
                                   loss_fn=self.loss_fn)
        self.stage.negotiate_shapes(self.data.x_train[:1] if self.grid.is_first_stage else None)

        self.optimizer = build_optimizer(config, module)
        self.strategy = build_strategy(config.strategy, self.grid.data, algorithm=config.allreduce,
                                       bucket_mb=config.bucket_mb, compression=config.compression,
                                       overlap=config.overlap)
        self.strategy.attach(module, self.optimizer)
        self.strategy.grad_transform = self._transform_gradients

        self.sampler = GlobalBatchSampler(len(self.data.x_train), config.batch_size, self.grid.data_rank,
                                          self.grid.data_parallel, seed=config.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        epochs = config.total_epochs
        self.total_steps = config.steps if config.steps is not None else epochs * self.steps_per_epoch
        self.step = 0
        self.samples = 0
        self.elapsed_s = 0.0
        self.run_loss = [0.0, 0.0]
        self.last_grad_norm: float | None = None
        # Per-stage timing, summed over the steps of the run and of the current log window.
        self.run_timing = [0.0, 0.0]
        self.window_timing = [0.0, 0.0]
        self.peak_activation_bytes = 0

    def _prepare_run_dir(self) -> Path:
        config = self.config
        run_dir = None
        if self.is_root:
            run_dir = Path(config.run_dir or default_run_dir(config))
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            replace(config, resume=None, run_dir=str(run_dir)).save(run_dir / "config.toml")
        return Path(self.comm.bcast_object(str(run_dir) if run_dir else None))

    @property
    def _reports_loss(self) -> bool:
        """True on the one rank per replica whose loss counts: the last stage, tensor-parallel rank 0."""
        return self.grid.is_last_stage and self.grid.tensor_rank == 0

    # Training

    def fit(self) -> dict[str, Any]:
        """Train to the configured length, evaluate, and write the run outputs."""
        config = self.config
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.is_root)
        progress = Progress(self.total_steps, enabled=self.is_root, mode=config.progress)
        log.info("training %s on %s: %d data-parallel x %d stages x %d tensor-parallel, %s schedule, "
                 "%d micro-batches, %d steps", config.model, config.dataset, self.grid.data_parallel,
                 self.grid.pipeline_stages, self.grid.tensor_parallel, config.pipeline_schedule,
                 config.micro_batches, self.total_steps)

        start = time.perf_counter()
        window = [0.0, 0.0]
        try:
            while self.step < self.total_steps:
                loss_sum, count = self._train_step()
                window[0] += loss_sum
                window[1] += count
                self.run_loss[0] += loss_sum
                self.run_loss[1] += count
                self.elapsed_s = time.perf_counter() - start
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    record = self._log_record(window)
                    metrics.log(record)
                    loss_text = f"{record['loss']:.4f}" if record["loss"] is not None else "-"
                    progress.update(self.step, {"loss": loss_text,
                                                "bubble": f"{record['pipeline_bubble_fraction']:.2f}"})
                    window = [0.0, 0.0]
                    self.window_timing = [0.0, 0.0]
        finally:
            progress.close()
            metrics.close()

        self.strategy.finish()
        self.strategy.close()
        return self._finish_run()

    def _train_step(self) -> tuple[float, int]:
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        if self.fail_at is not None and self.fail_at == (self.comm.rank, self.step):
            raise InjectedFailure(f"injected failure at step {self.step} (fail_at={self.config.fail_at})")

        indices = self.sampler.indices(epoch, step_in_epoch)
        global_batch = self.grid.data_parallel * self.config.batch_size
        global_samples = min(global_batch, len(self.data.x_train) - step_in_epoch * global_batch)
        set_learning_rate(self.optimizer, learning_rate(self.config, self.step, self.total_steps))
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.begin_step(len(indices), global_samples)

        sizes = micro_batch_sizes(len(indices), self.config.micro_batches)
        inputs = split_micro_batches(self.data.x_train[indices], sizes) if self.grid.is_first_stage else None
        targets = split_micro_batches(self.data.y_train[indices], sizes) if self.grid.is_last_stage else None
        stats = self.stage.train_step(sizes, inputs=inputs, targets=targets, no_sync=self.strategy.no_sync)
        self.strategy.step()

        # The run's bubble leaves out the first step, which pays one-time costs (allocation, lazy set-up).
        timings = [self.window_timing] if self.step == 0 and self.total_steps > 1 else [self.window_timing,
                                                                                        self.run_timing]
        for timing in timings:
            timing[0] += stats.idle_s
            timing[1] += stats.step_s
        self.peak_activation_bytes = max(self.peak_activation_bytes, stats.peak_activation_bytes)
        self.step += 1
        self.samples += global_samples
        if not self._reports_loss:
            return 0.0, 0
        return stats.loss_sum, stats.samples

    def _transform_gradients(self) -> bool:
        """Average replicated gradients over the tensor-parallel group, then clip by the global norm."""
        sync_replicated_gradients(self.stage.module, self.grid.tensor)
        if self.config.clip_norm is not None:
            self.last_grad_norm, _ = clip_grad_norm_global(self.stage.module.parameters(), self.config.clip_norm,
                                                           self.grid.model, self.grid.tensor_rank)
        return True

    # Metrics and outputs

    def _stage_vectors(self, timing: list[float]) -> tuple[list[float], list[float]]:
        """Return per-stage (idle_s, step_s) summed over the ranks of data replica 0, tensor rank 0."""
        stages = self.grid.pipeline_stages
        idle, busy = [0.0] * stages, [0.0] * stages
        if self.grid.data_rank == 0 and self.grid.tensor_rank == 0:
            idle[self.grid.stage], busy[self.grid.stage] = timing
        totals = self.comm.allreduce_scalars(idle + busy)
        return [float(v) for v in totals[:stages]], [float(v) for v in totals[stages:]]

    def _bubble_fields(self, timing: list[float]) -> dict[str, Any]:
        idle, busy = self._stage_vectors(timing)
        per_stage = [i / b if b > 0 else 0.0 for i, b in zip(idle, busy)]
        return {
            "pipeline_bubble_fraction": sum(per_stage) / len(per_stage),
            "pipeline_bubble_per_stage": [round(v, 4) for v in per_stage],
            "pipeline_bubble_formula": gpipe_bubble_fraction(self.grid.pipeline_stages, self.config.micro_batches),
        }

    def _log_record(self, window: list[float]) -> dict[str, Any]:
        loss_sum, count, sent = self.comm.allreduce_scalars([window[0], window[1], self.comm.bytes_sent])
        return {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": float(loss_sum / count) if count else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples": self.samples,
            "wall_time_s": round(self.elapsed_s, 4),
            "comm_bytes": int(sent),
            "grad_norm": self.last_grad_norm,
            **self._bubble_fields(self.window_timing),
        }

    def _peak_activation_per_stage(self) -> list[int]:
        stages = self.grid.pipeline_stages
        peaks = [0.0] * stages
        peaks[self.grid.stage] = float(self.peak_activation_bytes)
        return [int(v) for v in self.comm.allreduce_scalars(peaks, op="max")]

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float | None]:
        """Return (test_loss, test_accuracy) over the test set, split across data-parallel replicas."""
        self.stage.module.eval()
        indices = torch.arange(self.grid.data_rank, len(self.data.x_test), self.grid.data_parallel)
        loss_sum, correct, counted = 0.0, 0, 0
        for start in range(0, len(indices), self.config.eval_batch_size):
            batch = indices[start:start + self.config.eval_batch_size]
            sizes = micro_batch_sizes(len(batch), self.config.micro_batches)
            inputs = split_micro_batches(self.data.x_test[batch], sizes) if self.grid.is_first_stage else None
            outputs = self.stage.forward_only(sizes, inputs)
            if not self._reports_loss:
                continue
            for output, target in zip(outputs, split_micro_batches(self.data.y_test[batch], sizes)):
                weight = target.numel()
                if self.data.task != "regression":
                    hits, weight = count_correct(output, target, self.data.task)
                    correct += hits
                loss_sum += float(self.loss_fn(output, target)) * weight
                counted += weight
        self.stage.module.train()
        loss_sum, correct, counted = (float(v) for v in self.comm.allreduce_scalars([loss_sum, correct, counted]))
        accuracy = None if self.data.task == "regression" else correct / max(counted, 1.0)
        return loss_sum / max(counted, 1.0), accuracy

    def _finish_run(self) -> dict[str, Any]:
        test_loss, test_accuracy = self._evaluate()
        loss_sum, count = self.comm.allreduce_scalars(self.run_loss)
        comm_bytes = int(self.comm.allreduce_scalars([self.comm.bytes_sent])[0])
        parameters = int(self.comm.allreduce_scalars(
            [sum(p.numel() for p in self.stage.module.parameters()) if self.grid.data_rank == 0 else 0])[0])
        summary = {
            "strategy": self.config.strategy,
            "compression": self.config.compression,
            "world_size": self.comm.size,
            "steps": self.step,
            "samples": self.samples,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "wall_time_s": round(self.elapsed_s, 4),
            "samples_per_s": self.samples / max(self.elapsed_s, 1e-9),
            "train_loss": float(loss_sum / count) if count else float("nan"),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "comm_bytes": comm_bytes,
            "comm_bytes_per_step": comm_bytes / max(self.step, 1),
            "skipped_steps": self.strategy.skipped_steps,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "parameters": parameters,
            "run_dir": str(self.run_dir),
            "pipeline_stages": self.grid.pipeline_stages,
            "tensor_parallel": self.grid.tensor_parallel,
            "data_parallel": self.grid.data_parallel,
            "micro_batches": self.config.micro_batches,
            "pipeline_schedule": self.config.pipeline_schedule,
            **self._bubble_fields(self.run_timing),
            "peak_activation_bytes_per_stage": self._peak_activation_per_stage(),
        }
        self._save_shards()
        if self.is_root:
            write_summary(self.run_dir / "summary.json", summary)
        log.info("finished: test_loss=%.4f bubble=%.3f (GPipe formula %.3f) comm_bytes=%d", test_loss,
                 summary["pipeline_bubble_fraction"], summary["pipeline_bubble_formula"], comm_bytes)
        return summary

    def _save_shards(self) -> None:
        """Write this shard's parameters from data-parallel replica 0 as ``model-stage{p}-tp{t}.safetensors``."""
        # NOTE: shards are not merged into one model.safetensors, and runs write no checkpoints yet.
        if self.grid.data_rank == 0:
            name = f"model-stage{self.grid.stage}-tp{self.grid.tensor_rank}.safetensors"
            save_model(self.stage.module, str(self.run_dir / name))
