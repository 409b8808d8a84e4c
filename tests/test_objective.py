"""The step's objective, ``dino_weight * DINO loss + koleo_weight * KoLeo``: its gradient
against the terms computed apart on the same weights and crops (the KoLeo term by a
float64 brute force), and the ``--dino-weight`` field's checks."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.train import DINOTrainer
from helpers import tiny_trainer


def _crops(trainer: DINOTrainer) -> list[torch.Tensor]:
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return trainer.multicrop(images, torch.Generator().manual_seed(1))


def _step_gradients(trainer: DINOTrainer, crops) -> tuple[dict[str, torch.Tensor], float]:
    """The student's gradients after the trainer's own forward and backward, and the
    loss it logs."""
    loss = trainer._forward_backward(crops, teacher_temp=0.04)[2].item()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in trainer.student.named_parameters()}, loss


def _koleo_float64(features: torch.Tensor) -> torch.Tensor:
    """-mean_i log(min_{j != i} ||x_i - x_j|| + 1e-8) of the L2-normalised rows, from the
    full table of pairwise distances in float64."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).add(1e-30).sqrt()
    d = d + torch.diag(torch.full((len(x),), float("inf"), dtype=x.dtype))
    return -torch.log(d.min(dim=1).values + 1e-8).mean()


@pytest.fixture
def recipe(tiny_recipe):
    # No stochastic depth: the recomputation below must see the trainer's exact forward.
    return tiny_recipe.replace(drop_path=0.0)


def test_dino_weight_zero_trains_on_koleo_alone(recipe, tiny_vit_cfg):
    """With the DINO loss off, the student's gradient is the KoLeo term's, recomputed in
    float64 on each global view; the head, which KoLeo does not reach, gets none."""
    trainer = tiny_trainer(recipe.replace(dino_weight=0.0, koleo_weight=0.5), tiny_vit_cfg)
    crops = _crops(trainer)
    got, _ = _step_gradients(trainer, crops)

    fresh = tiny_trainer(recipe.replace(dino_weight=0.0, koleo_weight=0.5),  # same init
                     tiny_vit_cfg)
    params = dict(fresh.student.named_parameters())
    views = crops[0].chunk(recipe.n_global)
    expected = 0.5 * sum(_koleo_float64(fresh.student.backbone(v)) for v in views)
    grads = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        want = torch.zeros_like(p) if g is None else g.float()
        if name.startswith("head."):
            assert torch.count_nonzero(got[name]) == 0, name
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=1e-3, msg=name)
    assert any(torch.count_nonzero(got[n]) for n in params if n.startswith("backbone."))


def test_dino_weight_scales_the_dino_term_only(recipe, tiny_vit_cfg):
    """The objective is linear in each weight: (dino 0.5, koleo 0.3) gives half the
    gradient of (1, 0) plus the gradient of (0, 0.3), on the same weights and crops;
    the logged loss stays DINO's, whatever its weight."""
    grads, losses = {}, {}
    for w in ((1.0, 0.0), (0.0, 0.3), (0.5, 0.3)):
        trainer = tiny_trainer(recipe.replace(dino_weight=w[0], koleo_weight=w[1]), tiny_vit_cfg)
        crops = _crops(trainer)
        grads[w], losses[w] = _step_gradients(trainer, crops)
    for name, g in grads[0.5, 0.3].items():
        torch.testing.assert_close(g, 0.5 * grads[1.0, 0.0][name] + grads[0.0, 0.3][name],
                                   atol=1e-6, rtol=1e-4, msg=name)
    assert losses[1.0, 0.0] == losses[0.0, 0.3] == losses[0.5, 0.3]
    # Both terms reach the gradient, so the sum above is not a trivial one.
    assert any(torch.count_nonzero(g) for n, g in grads[1.0, 0.0].items()
               if n.startswith("head."))
    assert not all(torch.equal(g, grads[0.5, 0.3][n]) for n, g in grads[1.0, 0.0].items())


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="--koleo-weight"):
        SMALL.replace(dino_weight=0.0, koleo_weight=0.0).validate()
    SMALL.replace(dino_weight=0.0, koleo_weight=1.0).validate()  # KoLeo alone is allowed


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_weight_is_refused(bad):
    with pytest.raises(ConfigError, match="dino-weight"):
        SMALL.replace(dino_weight=bad, koleo_weight=1.0).validate()


def test_resume_identity_leaves_it_out_at_one():
    assert "dino_weight" not in recipe_identity(SMALL)
    assert recipe_identity(SMALL.replace(dino_weight=0.0, koleo_weight=1.0))[
        "dino_weight"] == 0.0
