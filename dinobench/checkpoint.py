"""Checkpoints: the trainer's whole state plus what it was trained on, written atomically.

A checkpoint is a ``torch.save`` archive of plain containers and tensors (loadable with
``weights_only=True``, so a foreign pickle cannot run code), tagged with a format name and
version, the run's configuration and the dataset's identity. Resuming compares that
identity with the current run and refuses on any difference.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_write_bytes

FORMAT = "dinobench-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, foreign, or from another run."""


def fingerprint(images: torch.Tensor) -> str:
    """A short content hash of a uint8 image tensor (the dataset's identity)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().data)
    return h.hexdigest()


def save(path: str | Path, identity: dict, trainer_state: dict) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "identity": identity,
                "trainer": trainer_state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path, map_location="cpu") -> dict:
    """Read and check a checkpoint; :class:`CheckpointError` names what is wrong."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as e:  # torch raises several types for damaged archives
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); it may be "
            "truncated or not written by dinobench. Delete it to start over (--restart)"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dinobench checkpoint (no '{FORMAT}' tag); "
                              "delete it or choose another --out")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {obj.get('version')}, "
                              f"this dinobench reads version {VERSION}; resume it with the "
                              "dinobench that wrote it, or start over with --restart")
    return obj


def check_identity(path: str | Path, saved: dict, current: dict) -> None:
    """Refuse to resume when the configuration or the data differ from the saved run."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise CheckpointError(f"cannot resume from {path}: the run differs from the one "
                              f"saved ({shown}); resume with the same flags and data, or "
                              "start over with --restart")
