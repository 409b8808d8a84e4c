"""The momentum (EMA) teacher (DINO, Eq. 2): theta_t <- lambda theta_t + (1 - lambda) theta_s."""

from __future__ import annotations

import weakref

import torch
from torch import nn

# teacher -> (weak student, teacher tensors, student tensors, slots), built on first use.
_PAIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _walk(model: nn.Module) -> tuple[dict[str, nn.Parameter], list]:
    """Parameters by name, in ``named_parameters`` order, and for each the slot that
    holds it: (owning module's parameter dict, local name, parameter)."""
    params, slots, seen = {}, [], set()
    for prefix, module in model.named_modules():
        for local, p in module._parameters.items():
            if p is None or p in seen:  # shared parameters count once, as in PyTorch
                continue
            seen.add(p)
            params[f"{prefix}.{local}" if prefix else local] = p
            slots.append((module._parameters, local, p))
    return params, slots


def _pair(teacher: nn.Module, student: nn.Module) -> tuple[list, list]:
    """The paired parameter lists, cached per teacher: walking both module trees costs
    more than the update itself on a GPU, checking that each cached parameter is still
    the one its module holds costs one dict lookup per parameter. In-place changes
    (``load_state_dict``, ``.to()``) keep the parameters, so the cache holds; replaced
    parameters (``load_state_dict(assign=True)``) fail the check and rebuild it.
    Parameters added to a module after the first update are not seen."""
    entry = _PAIRS.get(teacher)
    if entry is not None:
        student_ref, t_list, s_list, slots = entry
        if student_ref() is student and all(d.get(n) is p for d, n, p in slots):
            return t_list, s_list
    (t_params, t_slots), (s_params, s_slots) = _walk(teacher), _walk(student)
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))[:5]
        raise ValueError(f"teacher and student parameters differ: {missing}")
    names = list(t_params)
    bad = [n for n in names if t_params[n].shape != s_params[n].shape]
    if bad:  # _foreach_lerp_ would broadcast some mismatches silently
        raise ValueError(f"teacher and student parameter shapes differ: {bad[:5]}")
    t_list = [t_params[n] for n in names]
    s_list = [s_params[n] for n in names]
    _PAIRS[teacher] = (weakref.ref(student), t_list, s_list, t_slots + s_slots)
    return t_list, s_list


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
    t_list, s_list = _pair(teacher, student)
    torch._foreach_lerp_(t_list, s_list, 1.0 - momentum)
