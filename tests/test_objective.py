"""The step's objective, ``dino_weight * DINO loss + koleo_weight * KoLeo``: its gradient
against the terms computed apart on the same weights and crops (the KoLeo term by a
float64 brute force), and the ``--dino-weight`` field's checks."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from helpers import koleo_float64, step_crops, step_gradients, tiny_trainer


@pytest.fixture
def recipe(tiny_recipe):
    # No stochastic depth: the recomputation below must see the trainer's exact forward.
    return tiny_recipe.replace(drop_path=0.0)


def test_dino_weight_zero_trains_on_koleo_alone(recipe, tiny_vit_cfg):
    """With the DINO loss off, the student's gradient is the KoLeo term's, recomputed in
    float64 on each global view; the head, which KoLeo does not reach, gets none."""
    trainer = tiny_trainer(recipe.replace(dino_weight=0.0, koleo_weight=0.5), tiny_vit_cfg)
    crops = step_crops(trainer)
    got, _ = step_gradients(trainer, crops)

    fresh = tiny_trainer(recipe.replace(dino_weight=0.0, koleo_weight=0.5),  # same init
                     tiny_vit_cfg)
    params = dict(fresh.student.named_parameters())
    views = crops[0].chunk(recipe.n_global)
    expected = 0.5 * sum(koleo_float64(fresh.student.backbone(v)) for v in views)
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
        crops = step_crops(trainer)
        grads[w], losses[w] = step_gradients(trainer, crops)
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
