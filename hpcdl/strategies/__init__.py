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
}

# Where each strategy's class lives, imported only when a run uses it.
STRATEGY_CLASSES: dict[str, str] = {
    "allreduce": "hpcdl.strategies.allreduce:AllreduceStrategy",
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
