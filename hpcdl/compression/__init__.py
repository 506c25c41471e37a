"""Gradient and update compressors, built from spec strings."""

from __future__ import annotations

from hpcdl.specs import Param, Spec, parse_spec

# Parameter schema of every compression spec, checked before any rank starts.
COMPRESSION_PARAMS: dict[str, dict[str, Param]] = {
    "none": {},
}


def parse_compression(text: str) -> Spec:
    """Parse and validate a compression spec such as ``topk:ratio=0.01``."""
    return parse_spec(text, "compression", COMPRESSION_PARAMS)


__all__ = ["COMPRESSION_PARAMS", "parse_compression"]
