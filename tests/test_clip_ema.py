"""Host-light clipping and EMA: per-tensor clipping through the spread buffer equals a
float64 loop over tensors; the EMA's cached parameter pairing follows in-place loads and
notices replaced parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dinobench.dino import clip, ema
from dinobench.dino.clip import clip_per_tensor_
from dinobench.dino.ema import ema_update_
from dinobench.dino.model_setup import build_student_teacher


def _grads(seed: int) -> list[torch.Tensor]:
    """Gradients of mixed shapes and sizes: some above the clip norm, some below, one
    1-element, one non-contiguous (a transposed matrix)."""
    gen = torch.Generator().manual_seed(seed)
    shapes, scales = [(7,), (5, 3), (1,), (2, 3, 4), (6, 4), (1, 1, 8)], [0.1, 10, 5, 1, 50, 3]
    out = [torch.randn(s, generator=gen, dtype=torch.float64).float() * c
           for s, c in zip(shapes, scales)]
    out[4] = out[4].t()  # (4, 6), strides (1, 4)
    return out


def _brute_force(grads, max_norm):
    """Each tensor on its own, in float64: g * min(1, c / (||g|| + 1e-6))."""
    out = []
    for g in grads:
        g = g.double()
        norm = float(torch.sqrt((g * g).sum()))
        out.append(g * min(1.0, max_norm / (norm + 1e-6)))
    return out


@pytest.mark.parametrize("spread", [True, False])
def test_clip_equals_a_float64_loop_over_tensors(spread):
    """Each tensor is scaled as the float64 loop scales it; one already within the norm
    is multiplied by exactly 1, so it keeps every bit."""
    for seed in range(3):  # the spread buffer is reused from the second call on
        grads = _grads(seed)
        want = _brute_force(grads, 3.0)
        original = [g.clone() for g in grads]
        small = [float(g.double().norm()) + 1e-6 < 3.0 for g in grads]
        assert small[0] and not all(small)
        clip.clip_grads_per_tensor_(grads, 3.0, spread=spread)
        for g, w, o, s in zip(grads, want, original, small):
            torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-7)
            if s:  # factor min(1, ...) is exactly 1: bit for bit as it was
                assert torch.equal(g, o)


def test_spread_layout_is_built_once_per_layout():
    clip._LAYOUTS.clear()
    a, b = _grads(0), _grads(1)
    clip.clip_grads_per_tensor_(a, 1.0, spread=True)
    layout = next(iter(clip._LAYOUTS.values()))
    clip.clip_grads_per_tensor_(b, 1.0, spread=True)
    assert len(clip._LAYOUTS) == 1 and next(iter(clip._LAYOUTS.values())) is layout
    clip.clip_grads_per_tensor_(a[:3], 1.0, spread=True)
    assert len(clip._LAYOUTS) == 2
    # Each view is filled with its tensor's factor.
    scales = torch.tensor([0.5, 0.25, 2.0])
    spread = clip._spread(a[:3])
    torch.index_select(scales, 0, spread.index, out=spread.buffer)
    assert [v.shape for v in spread.views] == [g.shape for g in a[:3]]
    for v, s in zip(spread.views, scales):
        assert torch.equal(v, torch.full_like(v, float(s)))


def test_clip_per_tensor_takes_parameters_and_skips_missing_gradients():
    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3)),
              nn.Parameter(torch.zeros(2))]
    params[0].grad = torch.full((4,), 10.0)
    params[2].grad = torch.full((2,), 0.1)
    clip_per_tensor_(params, 2.0)
    assert params[1].grad is None
    torch.testing.assert_close(params[0].grad.norm(), torch.tensor(2.0), rtol=1e-5, atol=0)
    assert torch.equal(params[2].grad, torch.full((2,), 0.1))
    before = params[0].grad.clone()
    clip_per_tensor_(params, 0.0)  # 0: no clipping
    assert torch.equal(params[0].grad, before)


# --- the EMA's cached pairing -------------------------------------------------------


def _pair(tiny_recipe, tiny_vit_cfg):
    student, teacher = build_student_teacher(tiny_recipe, tiny_vit_cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    return student, teacher


def _expected(teacher, student, m):
    return {n: m * t.detach().double() + (1 - m) * s.detach().double()
            for (n, t), s in zip(teacher.named_parameters(), student.parameters())}


def _check(teacher, want):
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach().double(), want[n], rtol=1e-6, atol=1e-6,
                                   msg=lambda msg, n=n: f"{n}: {msg}")


@pytest.fixture
def walks(monkeypatch):
    """How often the EMA walked the module trees (built its pairing)."""
    count = [0]
    real = ema._walk

    def counting(model):
        count[0] += 1
        return real(model)

    monkeypatch.setattr(ema, "_walk", counting)
    return count


def test_ema_pairs_once_and_follows_in_place_loads(tiny_recipe, tiny_vit_cfg, walks):
    student, teacher = _pair(tiny_recipe, tiny_vit_cfg)
    ema_update_(teacher, student, 0.9)
    ema_update_(teacher, student, 0.9)
    assert walks[0] == 2  # teacher and student, once
    # load_state_dict copies into the existing parameters: the cached lists still point
    # at what the modules hold, and the update uses the loaded values.
    other_s, other_t = _pair(tiny_recipe, tiny_vit_cfg)
    student.load_state_dict(other_s.state_dict())
    teacher.load_state_dict(other_t.state_dict())
    want = _expected(teacher, student, 0.7)
    ema_update_(teacher, student, 0.7)
    assert walks[0] == 2
    _check(teacher, want)


def test_ema_rebuilds_when_parameters_are_replaced(tiny_recipe, tiny_vit_cfg, walks):
    student, teacher = _pair(tiny_recipe, tiny_vit_cfg)
    ema_update_(teacher, student, 0.9)
    other_s, other_t = _pair(tiny_recipe, tiny_vit_cfg)
    teacher.load_state_dict(copy.deepcopy(other_t.state_dict()), assign=True)
    student.load_state_dict(copy.deepcopy(other_s.state_dict()), assign=True)
    want = _expected(teacher, student, 0.6)
    ema_update_(teacher, student, 0.6)
    assert walks[0] == 4
    _check(teacher, want)


def test_ema_rebuilds_for_another_student(tiny_recipe, tiny_vit_cfg, walks):
    student, teacher = _pair(tiny_recipe, tiny_vit_cfg)
    ema_update_(teacher, student, 0.9)
    other, _ = _pair(tiny_recipe, tiny_vit_cfg)
    want = _expected(teacher, other, 0.5)
    ema_update_(teacher, other, 0.5)
    assert walks[0] == 4
    _check(teacher, want)
    with pytest.raises(ValueError, match="differ"):  # a wrong student is still refused
        ema_update_(teacher, nn.Linear(2, 2), 0.5)
