"""``--koleo-weight-end``: the KoLeo weight on a half-cosine over the run, checked against
the formula written out in float64, the step's use of the weight it is given, the fit's
use of the schedule, and the field's checks."""

from __future__ import annotations

import math

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from helpers import tiny_trainer


@pytest.fixture
def recipe(tiny_recipe):
    return tiny_recipe.replace(drop_path=0.0, koleo_weight=1.0)


def test_schedule_is_the_half_cosine_from_start_to_end(recipe, tiny_vit_cfg):
    trainer = tiny_trainer(recipe.replace(koleo_weight_end=0.2), tiny_vit_cfg)
    steps = 7
    got = trainer.schedules(steps)["koleo"]
    total = recipe.epochs * steps
    want = [0.2 + 0.8 * (1 + math.cos(math.pi * i / total)) / 2 for i in range(total)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got[0] == 1.0 and got[-1] > 0.2  # the end is approached, as the weight decay's


def test_unset_end_keeps_the_weight_constant(recipe, tiny_vit_cfg):
    trainer = tiny_trainer(recipe, tiny_vit_cfg)
    assert trainer.schedules(5)["koleo"].tolist() == [1.0] * (recipe.epochs * 5)


def test_step_uses_the_weight_it_is_given(recipe, tiny_vit_cfg):
    """A trainer whose recipe says 1.0, stepped with 0.3, takes the same step as a trainer
    of the same initialisation whose recipe says 0.3; stepped with its own 1.0 it takes
    another."""
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    kw = dict(lr=1e-2, wd=0.0, momentum=0.9, teacher_temp=0.04, freeze_last_layer=False)
    after = {}
    for name, w_recipe, w_step in (("given", 1.0, 0.3), ("recipe", 0.3, None),
                                   ("own", 1.0, None)):
        trainer = tiny_trainer(recipe.replace(koleo_weight=w_recipe), tiny_vit_cfg)
        trainer.step(images, torch.Generator().manual_seed(1), koleo_weight=w_step, **kw)
        after[name] = trainer.student.state_dict()
    for n, p in after["recipe"].items():
        torch.testing.assert_close(after["given"][n], p, atol=1e-6, rtol=1e-5, msg=n)
    assert not torch.equal(after["own"]["backbone.patch_embed.weight"],
                           after["recipe"]["backbone.patch_embed.weight"])


def test_fit_steps_with_the_scheduled_weight_and_logs_it(recipe, tiny_vit_cfg):
    trainer = tiny_trainer(recipe.replace(koleo_weight_end=0.0), tiny_vit_cfg)
    seen, step = [], trainer.step

    def spy(*args, koleo_weight=None, **kwargs):
        seen.append(koleo_weight)
        return step(*args, koleo_weight=koleo_weight, **kwargs)

    trainer.step = spy
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8)
    result = trainer.fit(images)
    steps = 24 // recipe.batch_size
    total = recipe.epochs * steps
    assert seen == pytest.approx([(1 + math.cos(math.pi * i / total)) / 2
                                  for i in range(total)], abs=1e-12)
    assert [h["koleo_weight"] for h in result.history] == pytest.approx(
        [seen[steps - 1], seen[-1]], abs=1e-12)


def test_constant_weight_is_not_logged(recipe, tiny_vit_cfg):
    trainer = tiny_trainer(recipe, tiny_vit_cfg)
    result = trainer.fit(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8))
    assert all("koleo_weight" not in h for h in result.history)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_end_is_refused(bad):
    with pytest.raises(ConfigError, match="--koleo-weight-end"):
        SMALL.replace(koleo_weight=1.0, koleo_weight_end=bad).validate()


def test_end_without_a_start_is_refused():
    with pytest.raises(ConfigError, match="--koleo-weight-end schedules"):
        SMALL.replace(koleo_weight_end=0.5).validate()
    SMALL.replace(koleo_weight=1.0, koleo_weight_end=0.0).validate()  # down to 0 is fine


def test_resume_identity_leaves_it_out_only_when_unset():
    with_koleo = SMALL.replace(koleo_weight=1.0)
    assert "koleo_weight_end" not in recipe_identity(with_koleo)
    assert recipe_identity(with_koleo.replace(koleo_weight_end=0.0))["koleo_weight_end"] == 0.0
