"""Atomic, integrity-checked checkpoints that never unpickle anything.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-00000123/`` holding one
safetensors file per rank (model, optimizer, strategy and RNG state; non-tensor
values travel as JSON in the file's metadata) and ``meta.json`` with the step,
the world size and the SHA-256 of every rank file. Ranks write into a hidden
temporary directory, which rank 0 renames into place only when every file is
complete; ``checkpoints/latest`` then names it, replaced atomically. A crash
mid-write therefore leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hpcdl.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_TREE_KEY = "hpcdl.tree"


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into named tensors and a JSON tree that refers to them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": [[walk(k, f"{path}/k{i}"), walk(v, f"{path}/{i}")]
                                 for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            return {"__list__" if isinstance(obj, list) else "__tuple__":
                    [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path!r}")

    return tensors, walk(state, prefix or "state")


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the nested state that ``flatten_state`` split."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["__dict__"]}
        if "__list__" in tree:
            return [unflatten_state(v, tensors) for v in tree["__list__"]]
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
    return tree


def all_finite(state: Any) -> bool:
    """Return True when every floating-point tensor in ``state`` is finite."""
    tensors, _ = flatten_state(state)
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.safetensors"


def save(run_dir: Path, step: int, state: dict[str, Any], comm, *, keep: int = 2,
         extra_meta: dict[str, Any] | None = None, world_size: int | None = None) -> Path:
    """Write this rank's ``state`` into the checkpoint for ``step``; collective.

    Args:
        run_dir: the run directory.
        step: the optimizer step the state belongs to.
        state: nested dicts and lists of tensors and plain values.
        comm: the world ``Communicator``; every rank must call this.
        keep: how many checkpoints to keep; older ones are removed.
        extra_meta: JSON values added to ``meta.json`` (epoch, config digest).
        world_size: the job's rank count, recorded for resume checks, when it
            differs from ``comm.size`` (one writer for every rank's state).

    Returns:
        The final checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    comm.barrier()

    tensors, tree = flatten_state(state)
    path = rank_file(tmp, comm.rank)
    save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(tree), "format": str(FORMAT_VERSION)})
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    comm.barrier()

    if comm.rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size or comm.size,
                "files": {rank_file(tmp, r).name: _sha256(rank_file(tmp, r)) for r in range(comm.size)}}
        meta.update(extra_meta or {})
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name + "\n")
        _prune(root, keep)
        log.info("checkpoint written: %s", final)
    comm.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """Return the latest complete checkpoint directory of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip()


def verify(directory: Path, world_size: int) -> dict[str, Any]:
    """Check a checkpoint's meta.json, rank count and file digests; return the meta.

    Raises:
        ConfigError: a missing, corrupt or mismatched checkpoint, naming the file and the fix.
    """
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Checkpoint {str(directory)!r} is unreadable ({exc}). "
                          "Resume from an earlier run directory or start a new run.") from None
    if meta.get("world_size") != world_size:
        raise ConfigError(
            f"Checkpoint {str(directory)!r} was written by {meta.get('world_size')} ranks, but this job "
            f"has {world_size}. Resume with -n {meta.get('world_size')}.")
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or _sha256(path) != digest:
            raise ConfigError(f"Checkpoint file {str(path)!r} is missing or corrupt (SHA-256 mismatch). "
                              "Resume from an earlier checkpoint or start a new run.")
    return meta


def load(directory: Path, rank: int) -> dict[str, Any]:
    """Load this rank's state from a verified checkpoint directory."""
    path = rank_file(directory, rank)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            tree = json.loads(handle.metadata()[_TREE_KEY])
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"Checkpoint file {str(path)!r} cannot be read ({exc}). "
                          "Resume from an earlier checkpoint or start a new run.") from None
    return unflatten_state(tree, tensors)
