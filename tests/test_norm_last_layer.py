"""``--no-norm-last-layer``: the official head's last layer with a learnt weight norm g
per output (the reference code's ``norm_last_layer=False``), against the float64 formula,
its freezing and weight decay, and the field's checks."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.heads import DINOHead, build_head
from dinobench.dino.model_setup import param_groups
from helpers import tiny_trainer


def test_output_is_g_times_the_cosine_in_float64():
    head = DINOHead(12, 7, hidden_dim=16, bottleneck_dim=5, norm_last_layer=False)
    g = torch.linspace(0.5, 4.0, 7).view(7, 1)
    with torch.no_grad():
        head.last_layer_g.copy_(g)
        head.last_layer_v.mul_(torch.linspace(0.1, 10.0, 7).view(7, 1))  # unequal norms
    x = torch.randn(3, 12)
    with torch.no_grad():
        out = head(x).double()
        z = head.mlp(x).double()
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer_v.detach().double()
    want = (z @ (v / v.norm(dim=1, keepdim=True)).T) * g.double().T
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out.abs().max() > 1  # no longer a cosine


def test_starts_as_the_normalised_head():
    torch.manual_seed(0)
    normed = DINOHead(12, 6, hidden_dim=16, bottleneck_dim=5)
    torch.manual_seed(0)
    learnt = DINOHead(12, 6, hidden_dim=16, bottleneck_dim=5, norm_last_layer=False)
    x = torch.randn(4, 12)
    torch.testing.assert_close(learnt(x), normed(x))
    assert torch.equal(learnt.last_layer_g, torch.ones(6, 1))


def test_normalised_head_has_no_g_to_save():
    """Checkpoints written before the option load into the default head unchanged."""
    head = DINOHead(12, 6, hidden_dim=16, bottleneck_dim=5)
    assert head.last_layer_g is None
    assert not any("last_layer_g" in k for k in head.state_dict())
    assert head.last_layer_parameters() == [head.last_layer_v]


def test_g_is_frozen_with_the_last_layer_and_learnt_after(tiny_recipe, tiny_vit_cfg):
    trainer = tiny_trainer(tiny_recipe.replace(norm_last_layer=False), tiny_vit_cfg)
    head = trainer.student.head
    assert head.last_layer_parameters() == [head.last_layer_v, head.last_layer_g]
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(1)
    kw = dict(lr=1e-2, wd=0.04, momentum=0.9, teacher_temp=0.04)
    trainer.step(images, gen, freeze_last_layer=True, **kw)
    assert torch.equal(head.last_layer_g, torch.ones_like(head.last_layer_g))
    trainer.step(images, gen, freeze_last_layer=False, **kw)
    assert not torch.equal(head.last_layer_g, torch.ones_like(head.last_layer_g))
    # The teacher follows by EMA.
    assert not torch.equal(trainer.teacher.head.last_layer_g, torch.ones_like(head.last_layer_g))


def test_g_is_weight_decayed_as_the_reference_code_does(tiny_recipe, tiny_vit_cfg):
    """The reference code decays every parameter of two or more dimensions; weight_g of
    a weight-normalised linear layer is (K, 1)."""
    trainer = tiny_trainer(tiny_recipe.replace(norm_last_layer=False), tiny_vit_cfg)
    decayed = next(g for g in param_groups(trainer.student) if g["decay"])["params"]
    assert any(p is trainer.student.head.last_layer_g for p in decayed)


def test_seed_head_refuses_it():
    with pytest.raises(ValueError, match="norm_last_layer"):
        build_head("seed", 8, 3, norm_last_layer=False)
    with pytest.raises(ConfigError, match="--norm-last-layer off needs --head official"):
        SMALL.replace(head="seed", head_bn=False, norm_last_layer=False).validate()
    SMALL.replace(norm_last_layer=False).validate()


def test_resume_identity_leaves_it_out_at_its_default():
    assert "norm_last_layer" not in recipe_identity(SMALL)
    assert recipe_identity(SMALL.replace(norm_last_layer=False))["norm_last_layer"] is False


def test_matches_torch_weight_norm_with_the_same_g_and_v():
    """The reference code's last layer is ``nn.utils.weight_norm(nn.Linear(...))``; torch's
    own parametrisation, given the same g and v, gives the same logits."""
    head = DINOHead(12, 6, hidden_dim=16, bottleneck_dim=5, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer_g.copy_(torch.rand(6, 1) * 3)
    linear = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(5, 6, bias=False))
    with torch.no_grad():
        linear.parametrizations.weight.original0.copy_(head.last_layer_g)
        linear.parametrizations.weight.original1.copy_(head.last_layer_v)
    x = torch.randn(4, 12)
    with torch.no_grad():
        want = linear(torch.nn.functional.normalize(head.mlp(x), dim=-1))
        torch.testing.assert_close(head(x), want, atol=1e-6, rtol=1e-5)
