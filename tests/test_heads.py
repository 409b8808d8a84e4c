"""Projection heads, and the official head's last layer frozen in epoch 0 of training."""

from __future__ import annotations

import math

import pytest
import torch

from dinobench.dino.heads import DINOHead, DINOModel, SeedHead, build_head
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer


def test_seed_head_is_one_linear_map():
    """The seed's head: (B, 192) -> (B, 10) by one affine map, nothing frozen."""
    head = SeedHead(192, 10)
    x = torch.randn(4, 192)
    out = head(x)
    assert out.shape == (4, 10)
    want = x.double() @ head.linear.weight.double().T + head.linear.bias.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert head.last_layer_parameters() == []
    assert sum(p.numel() for p in head.parameters()) == 192 * 10 + 10


def test_dino_head_shapes_and_parameters():
    """MLP in -> hidden -> hidden -> bottleneck, then a (K, bottleneck) last layer."""
    head = DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)
    assert head(torch.randn(5, 32)).shape == (5, 16)
    want = (32 * 24 + 24) + (24 * 24 + 24) + (24 * 8 + 8) + 16 * 8
    assert sum(p.numel() for p in head.parameters()) == want
    assert len(head.last_layer_parameters()) == 1
    assert head.last_layer_parameters()[0] is head.last_layer_v
    assert head.last_layer_v.shape == (16, 8)


def test_dino_head_default_sizes():
    """Defaults are the paper's 2048-2048-256 MLP."""
    head = DINOHead(192, 4)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (192, 2048), (2048, 2048), (2048, 256)]
    assert head.last_layer_v.shape == (4, 256)


def test_dino_head_equals_cosine_of_normalised_vectors():
    """Output = <x / |x|, v_k / |v_k|> with x the bottleneck output and v_k row k of the
    last layer: computed here in float64, row by row."""
    head = DINOHead(12, 7, hidden_dim=16, bottleneck_dim=5)
    with torch.no_grad():
        head.last_layer_v.mul_(torch.linspace(0.1, 10.0, 7).view(7, 1))  # unequal row norms
    x = torch.randn(3, 12)
    with torch.no_grad():
        out = head(x).double()
        z = head.mlp(x).double()
        V = head.last_layer_v.double()
    for b in range(3):
        zb = z[b] / math.sqrt(sum(float(t) ** 2 for t in z[b]))
        for k in range(7):
            vk = V[k] / math.sqrt(sum(float(t) ** 2 for t in V[k]))
            assert float(out[b, k]) == pytest.approx(float(zb @ vk), abs=1e-5)
    assert out.abs().max() <= 1 + 1e-6


def test_dino_head_weight_norm_is_fixed_to_one():
    """Scaling a row of the last layer leaves the output unchanged (g = 1, only the
    direction of v_k counts), and scaling the input leaves it unchanged (L2 norm)."""
    head = DINOHead(12, 6, hidden_dim=16, bottleneck_dim=5)
    x = torch.randn(4, 12)
    before = head(x)
    with torch.no_grad():
        head.last_layer_v[2].mul_(37.0)
    torch.testing.assert_close(head(x), before, rtol=1e-5, atol=1e-6)
    assert torch.all(head(100 * torch.randn(50, 12)).abs() <= 1 + 1e-6)


@pytest.mark.parametrize("cls", [SeedHead, DINOHead])
@pytest.mark.parametrize("K", [1, 0])
def test_k_below_two_rejected(cls, K):
    """A softmax over fewer than two outputs carries no information."""
    with pytest.raises(ValueError, match="K"):
        cls(16, K)


def test_build_head_and_model_order():
    """build_head picks by name; DINOModel keeps the crop order given, one row per crop."""
    assert isinstance(build_head("seed", 8, 3), SeedHead)
    assert isinstance(build_head("official", 8, 3, 16, 4), DINOHead)
    with pytest.raises(ValueError, match="head"):
        build_head("linear", 8, 3)
    backbone = torch.nn.Flatten()  # (B, 1, 2, 2) -> (B, 4): stands in for the ViT
    model = DINOModel(backbone, SeedHead(4, 3))
    a, b = torch.randn(2, 1, 2, 2), torch.randn(3, 1, 2, 2)
    out = model([a, b])
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, model.head(torch.cat([a.flatten(1), b.flatten(1)])))


# --- the last layer is frozen during the first epoch -----------------------------------


def make_trainer(tiny_recipe, tiny_vit_cfg, on_epoch_end=None):
    crop_cfg = MultiCropConfig.from_recipe(tiny_recipe, global_size=16, patch_size=4,
                                           mean=(0.5,), std=(0.25,))
    return DINOTrainer(tiny_recipe, tiny_vit_cfg, crop_cfg, device="cpu", progress=False,
                       log=lambda line: None, on_epoch_end=on_epoch_end)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_step_freezes_last_layer_only_when_asked(tiny_recipe, tiny_vit_cfg):
    """step(freeze_last_layer=True) leaves last_layer_v (and, as AdamW skips it, its
    weight decay) untouched while the rest of the student moves; with False it moves."""
    trainer = make_trainer(tiny_recipe, tiny_vit_cfg)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(1)
    kwargs = dict(lr=1e-3, wd=0.04, momentum=0.996, teacher_temp=0.04)

    before = snapshot(trainer.student)
    out = trainer.step(images, gen, freeze_last_layer=True, **kwargs)
    assert torch.isfinite(out["loss"])
    after = snapshot(trainer.student)
    assert torch.equal(after["head.last_layer_v"], before["head.last_layer_v"])
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert "head.mlp.0.weight" in moved and "backbone.patch_embed.weight" in moved
    assert len(moved) == len(before) - 1

    trainer.step(images, gen, freeze_last_layer=False, **kwargs)
    assert not torch.equal(trainer.student.head.last_layer_v, after["head.last_layer_v"])


def test_fit_freezes_last_layer_in_epoch_zero(tiny_recipe, tiny_vit_cfg):
    """Through fit: with freeze_last_layer_epochs=1 the last layer is unchanged after
    epoch 1 of 2 and changed after epoch 2, while the backbone moves in both."""
    seen = []

    def on_epoch_end(epoch, teacher):
        seen.append(snapshot(trainer.student))

    trainer = make_trainer(tiny_recipe, tiny_vit_cfg, on_epoch_end)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    init = snapshot(trainer.student)
    result = trainer.fit(images)
    assert len(result.history) == 2 and len(seen) == 2
    assert torch.equal(seen[0]["head.last_layer_v"], init["head.last_layer_v"])
    assert not torch.equal(seen[0]["backbone.patch_embed.weight"],
                           init["backbone.patch_embed.weight"])
    assert not torch.equal(seen[1]["head.last_layer_v"], init["head.last_layer_v"])


def test_head_batch_norm_uses_batch_statistics_in_eval_mode():
    """--head-bn: each hidden layer is normalised over the batch in hand, in eval mode
    too (the teacher), checked against a float64 forward written out by hand."""
    torch.manual_seed(0)
    head = DINOHead(6, 5, hidden_dim=8, bottleneck_dim=4, batch_norm=True).eval()
    x = torch.randn(7, 6)
    lin1, _, _, lin2, _, _, lin3 = head.mlp

    def bn(h):  # biased variance, eps 1e-5, weight 1 and bias 0 at initialisation
        return (h - h.mean(0)) / (h.var(0, unbiased=False) + 1e-5).sqrt()

    def gelu(h):
        return 0.5 * h * (1 + torch.erf(h / 2**0.5))

    d = {k: v.double() for k, v in head.state_dict().items()}
    h = gelu(bn(x.double() @ d["mlp.0.weight"].T + d["mlp.0.bias"]))
    h = gelu(bn(h @ d["mlp.3.weight"].T + d["mlp.3.bias"]))
    z = h @ d["mlp.6.weight"].T + d["mlp.6.bias"]
    z = z / z.norm(dim=1, keepdim=True)
    v = d["last_layer_v"] / d["last_layer_v"].norm(dim=1, keepdim=True)
    assert torch.allclose(head(x).double(), z @ v.T, atol=1e-5)
    assert not list(head.buffers())  # no running statistics


def test_head_batch_norm_spreads_nearly_identical_inputs():
    """The reason for the option: features that barely differ between images (a random
    ViT's CLS) give nearly equal logits without batch norm and distinct ones with it."""
    torch.manual_seed(0)
    x = torch.randn(1, 16) + 1e-3 * torch.randn(32, 16)
    spread = {}
    for bn in (False, True):
        torch.manual_seed(1)
        logits = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8, batch_norm=bn)(x)
        spread[bn] = (logits - logits.mean(0)).std().item()
    assert spread[False] < 1e-2 < 0.1 < spread[True]


def test_batch_norm_is_an_official_head_option_only():
    with pytest.raises(ValueError, match="seed head"):
        build_head("seed", 8, 3, batch_norm=True)
