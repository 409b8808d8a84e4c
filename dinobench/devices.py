"""Which torch device a command runs on, checked before any work starts."""

from __future__ import annotations

import torch

from .errors import ConfigError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """``--device`` as a torch device that exists here, or a :class:`ConfigError`."""
    try:
        device = torch.device(name or default_device())
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use cpu, cuda or "
                          "cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda" and not (torch.cuda.is_available() and (
            device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: no such CUDA device here; use --device cpu")
    return device
