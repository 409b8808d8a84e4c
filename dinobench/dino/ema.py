"""The momentum (EMA) teacher (DINO, Eq. 2): theta_t <- lambda theta_t + (1 - lambda) theta_s."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Move every teacher parameter towards the student's, in place.

    Parameters are paired by name, so a student with extra parameters (none in this
    package) would be an error rather than a silent mismatch. One fused ``_foreach``
    call: a few kernel launches instead of one per tensor. ``lerp`` is exact at both
    ends: momentum 0 copies the student, momentum 1 leaves the teacher untouched.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"teacher momentum must lie in [0, 1], got {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"teacher and student parameters differ: {missing}")
    names = list(t_params)
    bad = [n for n in names if t_params[n].shape != s_params[n].shape]
    if bad:  # _foreach_lerp_ would broadcast some mismatches silently
        raise ValueError(f"teacher and student parameter shapes differ: {bad[:5]}")
    torch._foreach_lerp_([t_params[n].data for n in names],
                         [s_params[n].data for n in names], 1.0 - momentum)
