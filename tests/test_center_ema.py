"""Centering (DINO Eq. 4) and the momentum teacher (Eq. 2) against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinobench.dino.center import update_center
from dinobench.dino.ema import ema_update_
from dinobench.dino.model_setup import build_student_teacher

# --- update_center --------------------------------------------------------------------


def reference_center(center, teacher_logits, momentum):
    """m * c + (1 - m) * row mean, with the mean as an explicit float64 loop over rows."""
    rows = teacher_logits.double()
    K = rows.shape[1]
    mean = [sum(float(rows[r, k]) for r in range(rows.shape[0])) / rows.shape[0]
            for k in range(K)]
    c = center.double().reshape(-1)
    out = torch.tensor([momentum * float(c[k]) + (1 - momentum) * mean[k] for k in range(K)],
                       dtype=torch.float64)
    return out.reshape(center.shape)


@pytest.mark.parametrize("shape", [(6,), (1, 6)])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 1.0])
def test_update_center_matches_float64(shape, momentum):
    """The new center is m c + (1 - m) mean(teacher rows), shaped like the old one."""
    center = torch.randn(shape)
    teacher = 4 * torch.randn(10, 6)
    got = update_center(center, teacher, momentum)
    assert got.shape == center.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_center(center, teacher, momentum),
                               rtol=1e-6, atol=1e-6)


def test_update_center_momentum_ends():
    """Momentum 0 gives the batch mean; momentum 1 returns the old center unchanged."""
    center = torch.randn(1, 5)
    teacher = torch.randn(7, 5)
    torch.testing.assert_close(update_center(center, teacher, 0.0),
                               teacher.mean(0, keepdim=True))
    assert torch.equal(update_center(center, teacher, 1.0), center)


def test_update_center_does_not_modify_inputs_or_track_grad():
    """A new tensor is returned: the old center and the teacher logits are untouched, and
    no autograd graph reaches the teacher."""
    center = torch.randn(1, 4)
    teacher = torch.randn(6, 4, requires_grad=True)
    before_c, before_t = center.clone(), teacher.detach().clone()
    out = update_center(center, teacher, 0.9)
    assert torch.equal(center, before_c) and torch.equal(teacher.detach(), before_t)
    assert out.data_ptr() != center.data_ptr()
    assert not out.requires_grad


def test_update_center_bf16_teacher():
    """bf16 teacher logits (autocast) update a float32 center in float32."""
    center = torch.zeros(1, 4)
    teacher = torch.randn(6, 4).bfloat16()
    got = update_center(center, teacher, 0.9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_center(center, teacher, 0.9),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [-0.1, 1.1, float("nan")])
def test_update_center_rejects_bad_momentum(momentum):
    """A momentum outside [0, 1] (or NaN) would extrapolate the running mean."""
    with pytest.raises(ValueError, match="momentum"):
        update_center(torch.zeros(3), torch.zeros(2, 3), momentum)


# --- ema_update_ -----------------------------------------------------------------------


def perturbed_pair(tiny_recipe, tiny_vit_cfg):
    """The real student/teacher pair, with the student moved away from the teacher."""
    student, teacher = build_student_teacher(tiny_recipe, tiny_vit_cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    return student, teacher


@pytest.mark.parametrize("momentum", [0.5, 0.996, 0.3])
def test_ema_matches_float64_per_parameter(tiny_recipe, tiny_vit_cfg, momentum):
    """Every teacher parameter becomes m * teacher + (1 - m) * student, in place; the
    student is not touched."""
    student, teacher = perturbed_pair(tiny_recipe, tiny_vit_cfg)
    t_before = {n: p.detach().double().clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, momentum)
    assert len(t_before) > 10  # the whole ViT + head, not an empty module
    for name, p in teacher.named_parameters():
        want = momentum * t_before[name] + (1 - momentum) * s_before[name].double()
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert p.data_ptr() == ptrs[name], f"{name} was replaced, not updated in place"
    for name, p in student.named_parameters():
        assert torch.equal(p, s_before[name])


def test_ema_momentum_ends_are_exact(tiny_recipe, tiny_vit_cfg):
    """Momentum 1 freezes the teacher bit for bit; momentum 0 copies the student bit for
    bit (no rounding residue from m * t + (1 - m) * s)."""
    student, teacher = perturbed_pair(tiny_recipe, tiny_vit_cfg)
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 1.0)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, frozen[n]), n
    ema_update_(teacher, student, 0.0)
    for (n, p), q in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(p, q), n


def test_ema_on_linear_modules():
    """Tiny nn.Linear pair: hand-checkable values."""
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        teacher.bias.fill_(-2.0)
        student.weight.fill_(3.0)
        student.bias.fill_(2.0)
    ema_update_(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, torch.full((2, 3), 1.5))  # 0.75*1 + 0.25*3
    assert torch.allclose(teacher.bias, torch.full((2,), -1.0))  # 0.75*-2 + 0.25*2


@pytest.mark.parametrize("momentum", [-0.01, 1.01])
def test_ema_rejects_bad_momentum(momentum):
    """A momentum outside [0, 1] would push the teacher away from the student."""
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), momentum)


def test_ema_rejects_different_parameter_names():
    """Parameters are paired by name: a different architecture is an error."""
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.9)
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 2), nn.Linear(3, 2, bias=False), 0.9)


def test_ema_rejects_broadcastable_shape_mismatch():
    """Same names, different shapes: a student Linear(3, 1) must not be broadcast into a
    teacher Linear(3, 2) (every teacher row would silently move towards the one student
    row). It must be a ValueError like a name mismatch, with the teacher left untouched."""
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 1)
    before = teacher.weight.detach().clone()
    with pytest.raises(ValueError):
        ema_update_(teacher, student, 0.5)
    assert torch.equal(teacher.weight, before)


def test_ema_rejects_incompatible_shapes():
    """Shapes that cannot broadcast (Linear(3, 2) vs Linear(3, 4)) are refused by the
    package's own check (a ValueError naming the parameters), not by whatever torch
    raises inside the update, and the teacher is left untouched."""
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 4)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with pytest.raises(ValueError, match=r"shapes differ: \['weight', 'bias'\]"):
        ema_update_(teacher, student, 0.5)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n]), n


def test_ema_pair_from_build_student_teacher(tiny_recipe, tiny_vit_cfg):
    """The teacher starts as an exact copy of the student (same initialisation), takes no
    gradient, and uses no stochastic depth."""
    student, teacher = build_student_teacher(tiny_recipe, tiny_vit_cfg)
    for (n, p), q in zip(student.named_parameters(), teacher.parameters()):
        assert torch.equal(p, q), n
        assert p.data_ptr() != q.data_ptr(), n
        assert not q.requires_grad
    assert all(b.drop_path.p == 0.0 for b in teacher.backbone.blocks)
    assert not teacher.training
