"""Synchronization strategies and the registry that builds them from spec strings."""

from __future__ import annotations

import importlib
from typing import Any

from hpcdl.comm import Communicator
from hpcdl.specs import Param, Spec, parse_spec
from hpcdl.strategies.base import Strategy, model_tensors

# Parameter schema of every strategy spec, checked before any rank starts.
STRATEGY_PARAMS: dict[str, dict[str, Param]] = {
    "allreduce": {},
    "local-sgd": {"period": Param(int, 8, min=1), "warmup": Param(int, 0, min=0)},
    "hierarchical": {"period": Param(int, 8, min=1)},
    "diloco": {"period": Param(int, 64, min=1), "outer_lr": Param(float, 0.7, min=0, min_exclusive=True),
               "outer_momentum": Param(float, 0.9, min=0, max=0.999)},
    "async": {"staleness_lr": Param(bool, False)},
    "ssp": {"staleness": Param(int, 3, min=0)},
    "bsp-ps": {},
    "hogwild": {},
}

# Module and class of each strategy, imported only when a run uses it.
STRATEGY_CLASSES: dict[str, str] = {
    "allreduce": "hpcdl.strategies.allreduce:AllreduceStrategy",
    "local-sgd": "hpcdl.strategies.local_sgd:LocalSGDStrategy",
    "hierarchical": "hpcdl.strategies.hierarchical:HierarchicalStrategy",
    "diloco": "hpcdl.strategies.diloco:DiLoCoStrategy",
    "async": "hpcdl.strategies.param_server:ParameterServerStrategy",
    "ssp": "hpcdl.strategies.param_server:ParameterServerStrategy",
    "bsp-ps": "hpcdl.strategies.param_server:ParameterServerStrategy",
    "hogwild": "hpcdl.strategies.hogwild:HogwildStrategy",
}


def parse_strategy(text: str) -> Spec:
    """Parse and validate a strategy spec such as ``local-sgd:period=8``."""
    return parse_spec(text, "strategy", STRATEGY_PARAMS)


def strategy_class(name: str) -> type[Strategy]:
    """Import and return the class that implements strategy ``name``."""
    module_name, _, class_name = STRATEGY_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_strategy(spec: str | Spec, comm: Communicator, **options: Any) -> Strategy:
    """Create the strategy named by ``spec`` on ``comm``.

    Args:
        spec: a spec string or an already parsed ``Spec``.
        comm: the data-parallel communicator.
        options: run-wide settings the strategy may take (``algorithm``,
            ``bucket_mb``, ``compression``); each class ignores what it does not use.
    """
    if isinstance(spec, str):
        spec = parse_strategy(spec)
    cls = strategy_class(spec.name)
    return cls.from_spec(spec, comm, **options)


__all__ = ["STRATEGY_CLASSES", "STRATEGY_PARAMS", "Strategy", "build_strategy", "model_tensors",
           "parse_strategy", "strategy_class"]
