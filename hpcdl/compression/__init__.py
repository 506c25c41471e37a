"""Gradient and update compressors, built from spec strings."""

from __future__ import annotations

import torch

from hpcdl.compression.base import Compressor
from hpcdl.specs import Param, Spec, parse_spec

# Parameter schema of every compression spec, checked before any rank starts.
COMPRESSION_PARAMS: dict[str, dict[str, Param]] = {
    "none": {},
    "fp16": {"ef": Param(bool, default=True)},
    "bf16": {"ef": Param(bool, default=True)},
    "topk": {"ratio": Param(float, required=True, min=0.0, min_exclusive=True, max=1.0),
             "ef": Param(bool, default=True)},
    # ef=None picks error feedback for the biased (unscaled) variant only.
    "randk": {"ratio": Param(float, required=True, min=0.0, min_exclusive=True, max=1.0),
              "unbiased": Param(bool, default=False), "seed": Param(int, default=0, min=0),
              "ef": Param(bool, default=None)},
    "qsgd": {"levels": Param(int, required=True, min=1, max=2**30), "seed": Param(int, default=0, min=0),
             "ef": Param(bool, default=False)},
    "signsgd": {"ef": Param(bool, default=True)},
    "powersgd": {"rank": Param(int, required=True, min=1), "seed": Param(int, default=0, min=0),
                 "ef": Param(bool, default=True)},
}


def parse_compression(text: str) -> Spec:
    """Parse and validate a compression spec such as ``topk:ratio=0.01``."""
    return parse_spec(text, "compression", COMPRESSION_PARAMS)


def build_compressor(spec: str | Spec | None) -> Compressor:
    """Create the compressor named by ``spec``; ``none`` or None sends tensors as they are."""
    if spec is None:
        return Compressor()
    if isinstance(spec, str):
        spec = parse_compression(spec)
    if spec.name == "none":
        return Compressor()
    params = dict(spec.params)
    if spec.name in ("fp16", "bf16"):
        from hpcdl.compression.cast import CastCompressor

        return CastCompressor(torch.float16 if spec.name == "fp16" else torch.bfloat16, **params)
    if spec.name == "topk":
        from hpcdl.compression.topk import TopKCompressor

        return TopKCompressor(params.pop("ratio"), **params)
    if spec.name == "randk":
        from hpcdl.compression.randk import RandKCompressor

        return RandKCompressor(params.pop("ratio"), **params)
    if spec.name == "qsgd":
        from hpcdl.compression.qsgd import QSGDCompressor

        return QSGDCompressor(params.pop("levels"), **params)
    if spec.name == "signsgd":
        from hpcdl.compression.signsgd import SignSGDCompressor

        return SignSGDCompressor(**params)
    if spec.name == "powersgd":
        from hpcdl.compression.powersgd import PowerSGDCompressor

        return PowerSGDCompressor(params.pop("rank"), **params)
    raise ValueError(f"no compressor class registered for {spec.name!r}")


__all__ = ["COMPRESSION_PARAMS", "Compressor", "build_compressor", "parse_compression"]
