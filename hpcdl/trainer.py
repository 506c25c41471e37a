"""The per-rank training loop behind ``hpcdl train`` and ``hpcdl.Trainer``."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI
from safetensors.torch import save_model

from hpcdl import checkpoint
from hpcdl.api import DistributedOptimizer, init, wrap
from hpcdl.comm import Communicator
from hpcdl.config import TrainConfig, parse_fail_at, parse_inject_nonfinite, replace
from hpcdl.config import parse_straggler
from hpcdl.data import GlobalBatchSampler, load_dataset
from hpcdl.evaluate import evaluate
from hpcdl.metrics import MetricsWriter, Progress, write_summary
from hpcdl.models import build_model, loss_function
from hpcdl.optim import build_optimizer, learning_rate, set_learning_rate

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_at`` testing aid."""


def default_run_dir(config: TrainConfig) -> Path:
    """Return ``runs/<timestamp>-<strategy>`` for a run without ``run_dir``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.strategy.partition(':')[0]}"


class Trainer:
    """Run one training job on this rank: data, model, strategy, loop, outputs.

    Every rank of the MPI job constructs it with the same config and calls
    ``fit()``. Rank 0 writes the run directory.

    Args:
        config: a validated config.
        comm: the communicator of the training ranks; the world communicator by
            default. Parameter-server jobs pass the workers' communicator.

    Example:
        >>> summary = hpcdl.Trainer(TrainConfig(dataset="digits", epochs=3)).fit()
    """

    def __init__(self, config: TrainConfig, comm: Communicator | None = None) -> None:
        self.config = config
        self.ctx = init(ranks_per_node=config.ranks_per_node)
        self.comm = comm if comm is not None else self.ctx.comm
        self.is_root = self.comm.rank == 0
        self.fail_at = parse_fail_at(config.fail_at)
        self.inject_nonfinite = parse_inject_nonfinite(config.inject_nonfinite)
        self.straggler = parse_straggler(config.straggler)
        self.run_dir = self._prepare_run_dir()

        torch.manual_seed(config.seed)
        self.data = load_dataset(config.dataset, seed=config.seed)
        self.model = build_model(config.model, self.data, hidden=config.hidden)
        optimizer = build_optimizer(config, self.model)
        self.model, self.optimizer = wrap(
            self.model, optimizer, strategy=config.strategy, compression=config.compression,
            clip_norm=config.clip_norm, algorithm=config.allreduce, bucket_mb=config.bucket_mb,
            comm=self.comm, overlap=config.overlap, precision=config.precision,
            max_skipped_steps=config.max_skipped_steps, ps_timeout_s=config.ps_timeout_s,
            push_delay=config.push_delay)
        self.loss_fn = loss_function(self.data.task)
        # Workers that never wait for each other (async) share no collective after
        # set-up: worker 0 alone evaluates, logs and writes checkpoints.
        self.independent = self.optimizer.strategy.independent_workers
        self.eval_comm = Communicator(MPI.COMM_SELF) if self.independent else self.comm

        self.sampler = GlobalBatchSampler(len(self.data.x_train), config.batch_size, self.comm.rank,
                                          self.comm.size, seed=config.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        epochs = config.total_epochs
        self.total_steps = config.steps if config.steps is not None else epochs * self.steps_per_epoch
        self.step = 0
        self.samples = 0
        self.elapsed_s = 0.0
        # Time inside training steps only, this run: samples/s leaves out
        # evaluation, logging and checkpoints.
        self.train_time_s = 0.0
        self.epoch_loss = [0.0, 0.0]
        self.last_accuracy: float | None = None
        self.last_comm_bytes = 0
        if config.resume:
            self._restore(Path(config.resume))

    # Set-up

    def _prepare_run_dir(self) -> Path:
        config = self.config
        run_dir = None
        if self.is_root:
            run_dir = Path(config.resume or config.run_dir or default_run_dir(config))
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            # Fault-injection aids are left out, so that a resumed run does not fail again.
            saved = replace(config, resume=None, run_dir=str(run_dir), fail_at=None, inject_nonfinite=None)
            saved.save(run_dir / "config.toml")
        run_dir = Path(self.comm.bcast_object(str(run_dir) if run_dir else None))
        return run_dir

    def _restore(self, run_dir: Path) -> None:
        directory = checkpoint.latest(run_dir)
        if directory is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}")
        checkpoint.verify(directory, self.comm.size)
        # Independent workers resume from worker 0's state, the only one saved.
        state = checkpoint.load(directory, 0 if self.independent else self.comm.rank)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if self.independent and not self.is_root:
            torch.manual_seed(self.config.seed + 1_000_003 * self.comm.rank + int(state["trainer"]["step"]))
        trainer = state["trainer"]
        self.step = int(trainer["step"])
        self.samples = int(trainer["samples"])
        self.elapsed_s = float(trainer["elapsed_s"])
        self.epoch_loss = [float(v) for v in trainer["epoch_loss"]]
        self.comm.counter.add(int(trainer["bytes_sent"]))
        log.info("resumed from %s at step %d", directory, self.step)

    # Training

    def fit(self) -> dict[str, Any]:
        """Train to the configured length, evaluate, and write the run outputs."""
        config = self.config
        metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.is_root,
                                resume_step=self.step if config.resume else None)
        progress = Progress(self.total_steps, initial=self.step, enabled=self.is_root, mode=config.progress)
        log.info("training %s on %s with %s for %d steps (%d per epoch) on %d ranks",
                 config.model, config.dataset, config.strategy, self.total_steps,
                 self.steps_per_epoch, self.comm.size)

        start = time.perf_counter() - self.elapsed_s
        start_samples = self.samples
        window = [0.0, 0.0]
        saved_step = self.step if config.resume else None
        try:
            while self._progress() < self.total_steps:
                step_start = time.perf_counter()
                loss_sum, count = self._train_step()
                self.train_time_s += time.perf_counter() - step_start
                window[0] += loss_sum
                window[1] += count
                self.epoch_loss[0] += loss_sum
                self.epoch_loss[1] += count
                self.elapsed_s = time.perf_counter() - start

                end_of_epoch = self.step % self.steps_per_epoch == 0
                leader = self.is_root or not self.independent
                if end_of_epoch and leader:
                    _, self.last_accuracy = evaluate(self.model, self.data, self.eval_comm,
                                                     batch_size=config.eval_batch_size)
                last = self._progress() >= self.total_steps
                if leader and (self.step % config.log_every == 0 or end_of_epoch or last):
                    record = self._log_record(window)
                    metrics.log(record)
                    progress.update(self._progress(), self._progress_fields(record, start_samples))
                    window = [0.0, 0.0]
                if leader and self._checkpoint_due(end_of_epoch, last):
                    self._save_checkpoint()
                    saved_step = self.step
                if end_of_epoch and not last:
                    self.epoch_loss = [0.0, 0.0]
            if self.independent and self.is_root and saved_step != self.step:
                # Worker 0's last local step need not fall on the run's last step.
                self._save_checkpoint()
        finally:
            progress.close()
            metrics.close()

        self.optimizer.finish()
        return self._finish_run(start_samples)

    def _train_step(self) -> tuple[float, int]:
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        if self.fail_at is not None and self.fail_at == (self.comm.rank, self.step):
            raise InjectedFailure(f"injected failure at step {self.step} (fail_at={self.config.fail_at})")

        indices = self.sampler.indices(epoch, step_in_epoch)
        global_samples = self.sampler.samples_in_step(step_in_epoch)
        progress = min(self._progress(), self.total_steps - 1)
        set_learning_rate(self.optimizer, learning_rate(self.config, progress, self.total_steps))
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.set_sample_count(len(indices), global_samples)

        loss_sum = 0.0
        compute_start = time.perf_counter()
        micro_batches = [m for m in torch.tensor_split(indices, self.config.accumulate) if len(m)]
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.optimizer.no_sync()
            # Backward stays inside no_sync: the gradient hooks fire there.
            with sync:
                with self._autocast():
                    loss = self.loss_fn(self.model(self.data.x_train[micro]), self.data.y_train[micro])
                # Scale so the local gradient is the mean over this rank's samples.
                weighted = loss * (len(micro) / len(indices))
                if last and self._injecting_nonfinite():
                    weighted = weighted * float("inf")
                self.optimizer.scale_loss(weighted).backward()
            loss_sum += float(loss.detach()) * len(micro)
        self._straggle(time.perf_counter() - compute_start)

        self.optimizer.step()
        self.step += 1
        if self.independent:
            # Workers step at their own pace; the job's samples follow its progress.
            self.samples = self._progress() * self.sampler.global_batch_size
        else:
            self.samples += global_samples
        return loss_sum, len(indices)

    def _progress(self) -> int:
        """Steps the job has done: this rank's, or the strategy's count where ranks step independently."""
        progress = self.optimizer.strategy.progress_steps()
        return self.step if progress is None else progress

    def _straggle(self, compute_s: float) -> None:
        # Fault injection: this rank's forward and backward take FACTOR times as long.
        if self.straggler is not None and self.straggler[0] == self.comm.rank:
            time.sleep((self.straggler[1] - 1.0) * compute_s)

    def _injecting_nonfinite(self) -> bool:
        if self.inject_nonfinite is None:
            return False
        rank, first, last = self.inject_nonfinite
        return rank == self.comm.rank and first <= self.step <= last

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.config.precision == "fp16":
            return torch.autocast("cpu", dtype=torch.float16)
        return contextlib.nullcontext()

    # Logging, checkpoints, outputs

    def _log_record(self, window: list[float]) -> dict[str, Any]:
        strategy_metrics = self.optimizer.strategy.metrics()
        if self.independent:
            # No collective: the loss is worker 0's, the bytes are what the shards received.
            loss_sum, count = window
            sent = strategy_metrics.get("ps_bytes_received", self.comm.bytes_sent)
        else:
            loss_sum, count, sent = self.comm.allreduce_scalars([window[0], window[1], self.comm.bytes_sent])
        self.last_comm_bytes = int(sent)
        progress = self._progress()
        record = {
            "step": progress,
            "epoch": round(progress / self.steps_per_epoch, 4),
            "loss": float(loss_sum / count) if count else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples": self.samples,
            "wall_time_s": round(self.elapsed_s, 4),
            "comm_bytes": self.last_comm_bytes,
            "test_accuracy": self.last_accuracy,
            "skipped_steps": self.optimizer.strategy.skipped_steps,
        }
        record.update(strategy_metrics)
        return record

    def _progress_fields(self, record: dict[str, Any], start_samples: int) -> dict[str, str]:
        rate = (self.samples - start_samples) / max(self.train_time_s, 1e-9)
        fields = {"loss": f"{record['loss']:.4f}" if record["loss"] is not None else "-"}
        if self.last_accuracy is not None:
            fields["acc"] = f"{self.last_accuracy:.3f}"
        fields["samples/s"] = f"{rate:.0f}"
        fields["sent"] = f"{record['comm_bytes'] / 1e6:.1f}MB"
        return fields

    def _checkpoint_due(self, end_of_epoch: bool, last: bool) -> bool:
        every = self.config.checkpoint_every
        if every > 0:
            return self.step % every == 0 or last
        return end_of_epoch or last

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "trainer": {"step": self.step, "samples": self.samples, "elapsed_s": self.elapsed_s,
                        "epoch_loss": list(self.epoch_loss), "bytes_sent": self.comm.bytes_sent},
        }
        finite = checkpoint.all_finite(state)
        if not self.independent:
            finite = self.comm.allreduce_scalars([0.0 if finite else 1.0], op="max")[0] == 0
        if not finite:
            log.error("checkpoint at step %d skipped: a rank has non-finite values in its state", self.step)
            return
        # Independent workers: worker 0 writes the one state file that every worker resumes from.
        checkpoint.save(self.run_dir, self.step, state, self.eval_comm, keep=self.config.keep_checkpoints,
                        extra_meta={"epoch": self.step / self.steps_per_epoch}, world_size=self.comm.size)

    def _finish_run(self, start_samples: int) -> dict[str, Any]:
        strategy_metrics = self.optimizer.strategy.metrics()
        if self.independent:
            # Every worker has the final model, and worker 0 alone evaluates and reports.
            test_loss, test_accuracy = (evaluate(self.model, self.data, self.eval_comm,
                                                 batch_size=self.config.eval_batch_size)
                                        if self.is_root else (float("nan"), None))
            loss_sum, count = self.epoch_loss
            comm_bytes = int(strategy_metrics.get("ps_bytes_received", self.comm.bytes_sent))
        else:
            test_loss, test_accuracy = evaluate(self.model, self.data, self.comm,
                                                batch_size=self.config.eval_batch_size)
            loss_sum, count = self.comm.allreduce_scalars(self.epoch_loss)
            comm_bytes = int(self.comm.allreduce_scalars([self.comm.bytes_sent])[0])
        run_samples = self.samples - start_samples
        steps = self._progress()
        summary = {
            "strategy": self.config.strategy,
            "compression": self.config.compression,
            "world_size": self.comm.size,
            "steps": steps,
            "samples": self.samples,
            "epochs": round(steps / self.steps_per_epoch, 4),
            "wall_time_s": round(self.elapsed_s, 4),
            "samples_per_s": run_samples / max(self.train_time_s, 1e-9),
            "train_time_s": round(self.train_time_s, 4),
            "train_loss": float(loss_sum / count) if count else float("nan"),
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "comm_bytes": comm_bytes,
            "comm_bytes_per_step": comm_bytes / max(steps, 1),
            "skipped_steps": self.optimizer.strategy.skipped_steps,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "run_dir": str(self.run_dir),
        }
        summary.update(strategy_metrics)
        if self.is_root:
            save_model(self.model, str(self.run_dir / "model.safetensors"))
            write_summary(self.run_dir / "summary.json", summary)
        if self.is_root or not self.independent:
            log.info("finished: test_accuracy=%s test_loss=%.4f samples/s=%.0f comm_bytes=%d",
                     test_accuracy, test_loss, summary["samples_per_s"], comm_bytes)
        return summary
