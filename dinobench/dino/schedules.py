"""Per-step schedules for learning rate, weight decay and teacher momentum."""

from __future__ import annotations

import numpy as np


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """A linear warm-up then a half-cosine from ``base`` to ``final``.

    Returns ``total_steps`` float64 values: first ``warmup_steps`` values rising linearly
    from ``warmup_start`` to ``base`` (both ends included), then for ``i = 0..n-1`` over
    the remaining ``n`` steps, ``final + (base - final) * (1 + cos(pi * i / n)) / 2``.
    """
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"steps must not be negative, got total_steps={total_steps}, "
                         f"warmup_steps={warmup_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")
    warmup = np.linspace(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    i = np.arange(n)
    decay = final + (base - final) * (1 + np.cos(np.pi * i / max(n, 1))) / 2
    return np.concatenate([warmup, decay]).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int,
                          epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear from ``warmup_temp`` to ``temp`` over
    ``warmup_epochs`` epochs, then constant (as in the DINO reference code). A run shorter
    than the warm-up stops part-way up the same ramp."""
    ramp = np.linspace(warmup_temp, temp, warmup_epochs)
    return np.concatenate([ramp, np.full(max(epochs - warmup_epochs, 0), temp)])[:epochs]
