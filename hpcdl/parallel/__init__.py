"""Model parallelism: process grids, pipeline stages, tensor-parallel layers and global-norm clipping."""

from hpcdl.parallel.clip import clip_grad_norm_global, global_grad_norm
from hpcdl.parallel.grid import ProcessGrid, data_parallel_size
from hpcdl.parallel.pipeline import (SCHEDULES, PipelineStage, StepStats, balanced_split_points,
                                     gpipe_bubble_fraction, micro_batch_sizes, parse_split_points,
                                     schedule_ops, split_micro_batches, split_stage)
from hpcdl.parallel.tensor import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention,
                                   ParallelTransformerBlock, RowParallelLinear, sync_replicated_gradients,
                                   tensor_parallelize)

__all__ = [
    "SCHEDULES",
    "ColumnParallelLinear",
    "ParallelMLP",
    "ParallelSelfAttention",
    "ParallelTransformerBlock",
    "PipelineStage",
    "ProcessGrid",
    "RowParallelLinear",
    "StepStats",
    "balanced_split_points",
    "clip_grad_norm_global",
    "data_parallel_size",
    "global_grad_norm",
    "gpipe_bubble_fraction",
    "micro_batch_sizes",
    "parse_split_points",
    "schedule_ops",
    "split_micro_batches",
    "split_stage",
    "sync_replicated_gradients",
    "tensor_parallelize",
]
