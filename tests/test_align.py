"""The feature-alignment term (``--align-weight``): the loss against a float64 loop over
DINO's view pairs and a hand-derived case, no gradient into the teacher, the step's
gradient against the terms recomputed apart, and the field's checks."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.align import alignment_loss
from helpers import koleo_float64, step_crops, step_gradients, tiny_trainer


def _align_float64(student: torch.Tensor, teacher: torch.Tensor, n_global: int) -> torch.Tensor:
    """The mean of ||s/|s| - t/|t|||^2 over every (teacher view i, student view v != i,
    image b), one term at a time, in float64."""
    b = teacher.shape[0] // n_global
    views = student.shape[0] // b
    terms = []
    for i in range(n_global):
        for v in range(views):
            if v == i:
                continue
            for k in range(b):
                s = student[v * b + k].double()
                t = teacher[i * b + k].double()
                terms.append((s / s.norm() - t / t.norm()).pow(2).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("n_global, views", [(2, 2), (2, 6), (3, 5)])
def test_matches_a_float64_loop_over_the_pairs(n_global, views):
    g = torch.Generator().manual_seed(n_global * 10 + views)
    b, d = 4, 7
    student = torch.randn(views * b, d, generator=g) * 3
    teacher = torch.randn(n_global * b, d, generator=g) * 0.5
    got = alignment_loss(student, teacher, n_global)
    torch.testing.assert_close(got.double(), _align_float64(student, teacher, n_global),
                               atol=1e-6, rtol=1e-5)


def test_hand_case_leaves_out_each_view_with_itself():
    """Two global views of one image, each the teacher's own view exactly (at another
    norm), the two orthogonal: every kept pair is orthogonal, 2 - 2 cos = 2. Counting a
    view with itself would give 1."""
    student = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert alignment_loss(student, teacher, 2).item() == pytest.approx(2.0)
    # A local view that points where both teachers' views do half-way: cos = 1/sqrt(2).
    local = torch.tensor([[1.0, 1.0]])
    got = alignment_loss(torch.cat([student, local]), teacher, 2).item()
    assert got == pytest.approx((2 + 2 + 2 * (2 - 2 ** 0.5)) / 4)


def test_no_gradient_reaches_the_teacher():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    alignment_loss(student, teacher, 2).backward()
    assert teacher.grad is None
    assert torch.count_nonzero(student.grad) > 0


def test_features_of_another_batch_are_refused():
    with pytest.raises(ValueError, match="view-major"):
        alignment_loss(torch.randn(7, 4), torch.randn(4, 4), 2)


def test_step_gradient_is_koleo_plus_alignment(tiny_recipe, tiny_vit_cfg):
    """With DINO's loss off, the student's gradient is KoLeo's plus the alignment term's,
    both recomputed in float64 from the backbones of a trainer of the same initialisation:
    the student's CLS features of every crop against the teacher's of the global views."""
    recipe = tiny_recipe.replace(drop_path=0.0, dino_weight=0.0, koleo_weight=0.5,
                                 align_weight=2.0)
    trainer = tiny_trainer(recipe, tiny_vit_cfg)
    crops = step_crops(trainer)
    got, _ = step_gradients(trainer, crops)

    fresh = tiny_trainer(recipe, tiny_vit_cfg)
    params = dict(fresh.student.named_parameters())
    student = torch.cat([fresh.student.backbone(c) for c in crops])
    with torch.no_grad():
        teacher = fresh.teacher.backbone(crops[0])
    expected = (0.5 * sum(koleo_float64(v) for v in
                          student[:crops[0].shape[0]].chunk(recipe.n_global))
                + 2.0 * _align_float64(student, teacher, recipe.n_global))
    grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        want = torch.zeros_like(p) if g is None else g.float()
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-3, msg=name)
    # The alignment term reaches the gradient: without it the backbone's differs.
    without = tiny_trainer(recipe.replace(align_weight=0.0), tiny_vit_cfg)
    plain, _ = step_gradients(without, crops)
    assert not torch.allclose(plain["backbone.patch_embed.weight"],
                              got["backbone.patch_embed.weight"])


def test_alone_it_is_refused():
    with pytest.raises(ConfigError, match="--koleo-weight"):
        SMALL.replace(align_weight=1.0).validate()
    SMALL.replace(align_weight=1.0, koleo_weight=1.0).validate()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_weight_is_refused(bad):
    with pytest.raises(ConfigError, match="align-weight"):
        SMALL.replace(align_weight=bad, koleo_weight=1.0).validate()


def test_resume_identity_leaves_it_out_at_zero():
    assert "align_weight" not in recipe_identity(SMALL)
    assert recipe_identity(SMALL.replace(align_weight=0.5, koleo_weight=1.0))[
        "align_weight"] == 0.5


def test_with_ibot_masks_hiding_nothing_it_is_the_plain_path(tiny_recipe, tiny_vit_cfg):
    """Under iBOT the teacher's features come from its patch-token forward; with masks
    that hide nothing that path must give the alignment (and everything else) the same
    gradient as the trainer without iBOT, whose gradient the test above checks."""
    recipe = tiny_recipe.replace(drop_path=0.0, koleo_weight=0.5, align_weight=2.0)
    with_ibot = tiny_trainer(recipe.replace(ibot_weight=1.0), tiny_vit_cfg)
    plain = tiny_trainer(recipe, tiny_vit_cfg)
    crops = step_crops(plain)
    none = torch.zeros(crops[0].shape[0], tiny_vit_cfg.grid ** 2, dtype=torch.bool)
    with_ibot._forward_backward(crops, 0.04, none)
    plain._forward_backward(crops, 0.04)
    a = dict(with_ibot.student.named_parameters())
    for name, p in plain.student.named_parameters():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        got = torch.zeros_like(p) if a[name].grad is None else a[name].grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
