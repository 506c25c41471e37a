"""Checks of the pipeline and tensor-parallel settings, run before any rank starts."""

from __future__ import annotations

from hpcdl.config import TrainConfig
from hpcdl.errors import ConfigError
from hpcdl.parallel.grid import data_parallel_size
from hpcdl.parallel.pipeline import SCHEDULES, parse_split_points

# Strategies that keep data-parallel replicas in step over their own
# sub-communicator; parameter-server and shared-window strategies do not fit a grid.
GRID_STRATEGIES = ("allreduce", "local-sgd", "hierarchical", "diloco")

# Attention heads of the built-in transformer, which tensor parallelism splits.
TRANSFORMER_HEADS = 4


def builtin_model_layers(model: str, dataset: str) -> int | None:
    """Return the top-level layer count of a built-in model as ``hpcdl train`` builds it, or None for a factory.

    Pipeline stages split the model between these layers, so P cannot exceed this count.
    """
    language_model = dataset.partition(":")[0] == "pycode"
    counts = {"linear": 2, "mlp": 5 if language_model else 6, "cnn": 12, "transformer": 5}
    return counts.get(model)


def check_parallel_config(config: TrainConfig, world_size: int) -> None:
    """Raise ConfigError for a grid, schedule or combination that cannot run on ``world_size`` ranks."""
    for name in ("pipeline_stages", "tensor_parallel", "micro_batches"):
        value = getattr(config, name)
        if value < 1:
            raise ConfigError(f"Invalid {name.replace('_', '-')}={value}: it must be 1 or more.")
    if config.pipeline_schedule not in SCHEDULES:
        raise ConfigError(f"Invalid pipeline-schedule={config.pipeline_schedule!r}: use one of "
                          f"{', '.join(SCHEDULES)}.")
    data_parallel_size(world_size, config.pipeline_stages, config.tensor_parallel)
    parse_split_points(config.pipeline_split, config.pipeline_stages)
    if config.pipeline_stages == 1 and config.tensor_parallel == 1:
        return

    grid = f"pipeline-stages={config.pipeline_stages}, tensor-parallel={config.tensor_parallel}"
    layers = builtin_model_layers(config.model, config.dataset)
    if layers is not None and config.pipeline_stages > layers:
        raise ConfigError(f"Invalid pipeline-stages={config.pipeline_stages}: model {config.model!r} has "
                          f"{layers} top-level layers, so it can be split into at most {layers} stages.")
    strategy = config.strategy.partition(":")[0]
    if strategy not in GRID_STRATEGIES:
        raise ConfigError(f"Invalid strategy={config.strategy!r} with {grid}: the data-parallel dimension "
                          f"of a process grid supports {', '.join(GRID_STRATEGIES)}.")
    if config.tensor_parallel > 1:
        if config.model != "transformer":
            raise ConfigError(f"Invalid model={config.model!r} with tensor-parallel={config.tensor_parallel}: "
                              "tensor parallelism splits the blocks of the built-in 'transformer' model. "
                              "Use --model transformer, or --tensor-parallel 1.")
        if TRANSFORMER_HEADS % config.tensor_parallel:
            raise ConfigError(f"Invalid tensor-parallel={config.tensor_parallel}: the transformer's "
                              f"{TRANSFORMER_HEADS} attention heads must divide evenly, so use 1, 2 or 4.")
    if config.resume:
        raise ConfigError(f"Invalid resume with {grid}: resuming pipeline or tensor-parallel runs is not "
                          "supported yet. Start a new run.")
    if config.accumulate > 1:
        raise ConfigError(f"Invalid accumulate={config.accumulate} with {grid}: use --micro-batches to split "
                          "each step into micro-batches instead.")
    if config.precision != "fp32":
        raise ConfigError(f"Invalid precision={config.precision!r} with {grid}: pipeline and tensor-parallel "
                          "runs support fp32 only.")
