"""The KoLeo regulariser: its value and gradient against a float64 brute force, a
hand-derived case, and its place in the step (the backbone's gradient only)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.koleo import koleo_loss
from helpers import tiny_trainer


def brute_force(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """float64, one pair at a time: -mean_i log(min_{j != i} ||x_i - x_j|| + eps) of the
    L2-normalised rows."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        nearest = min((x[i] - x[j]).norm() for j in range(n) if j != i)
        total = total - torch.log(nearest + eps)
    return total / n


def test_value_and_gradient_against_float64_brute_force():
    torch.manual_seed(0)
    f = torch.randn(12, 5, requires_grad=True)
    loss = koleo_loss(f)
    loss.backward()
    g = f.detach().double().requires_grad_()
    expected = brute_force(g)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(f.grad.double(), g.grad, atol=1e-5, rtol=1e-4)


def test_hand_derived_square():
    """Four unit vectors 90 degrees apart (any length, any rotation): every nearest
    neighbour is sqrt(2) away, so the loss is -log sqrt(2)."""
    angles = torch.tensor([0.3, 0.3 + math.pi / 2, 0.3 + math.pi, 0.3 + 3 * math.pi / 2])
    f = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2], [3], [4]])
    assert koleo_loss(f).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)


def test_a_gradient_step_pushes_the_closest_pair_apart():
    f = torch.tensor([[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                     requires_grad=True)
    koleo_loss(f).backward()
    moved = (f - 0.01 * f.grad).detach()
    unit = moved / moved.norm(dim=1, keepdim=True)
    before = (f[0] / f[0].norm() - f[1] / f[1].norm()).norm()
    assert (unit[0] - unit[1]).norm() > before


def test_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))


def test_step_adds_it_to_the_backbone_gradient_only(tiny_recipe, tiny_vit_cfg):
    """Same seed, weights and crops: with KoLeo the logged loss (DINO's) is unchanged,
    the head (which KoLeo does not reach) takes the same step, the backbone another."""
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    after, losses = [], []
    for w in (0.0, 0.5):
        trainer = tiny_trainer(tiny_recipe.replace(koleo_weight=w), tiny_vit_cfg)
        out = trainer.step(images, torch.Generator().manual_seed(1), lr=1e-2, wd=0.0,
                           momentum=0.9, teacher_temp=0.04, freeze_last_layer=False)
        losses.append(out["loss"].item())
        after.append(trainer.student.state_dict())
    assert losses[0] == losses[1]
    plain, koleo = after
    for name in plain:
        same = torch.equal(plain[name], koleo[name])
        if name.startswith("head."):
            assert same, name
    changed = [n for n in plain if n.startswith("backbone.")
               and not torch.equal(plain[n], koleo[n])]
    assert "backbone.patch_embed.weight" in changed and len(changed) > 5


@pytest.mark.parametrize("bad", [-0.1, float("inf")])
def test_bad_weight_is_refused(bad):
    with pytest.raises(ConfigError, match="koleo"):
        SMALL.replace(koleo_weight=bad).validate()


def test_resume_identity_leaves_it_out_only_at_zero():
    assert "koleo_weight" not in recipe_identity(SMALL)
    assert recipe_identity(SMALL.replace(koleo_weight=0.1))["koleo_weight"] == 0.1


def test_matches_a_table_of_all_pairwise_distances():
    x = torch.randn(6, 3, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    d = {(i, j): (x[i] - x[j]).norm().item() for i, j in itertools.permutations(range(6), 2)}
    expected = -sum(math.log(min(d[i, j] for j in range(6) if j != i) + 1e-8)
                    for i in range(6)) / 6
    assert koleo_loss(x.float()).item() == pytest.approx(expected, abs=1e-5)
