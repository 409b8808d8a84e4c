"""The compact ViT: SDPA vs explicit attention, attention maps, positional-embedding
interpolation, the seed's parameter counts, config errors and stochastic depth."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dinobench.dino.heads import SeedHead
from dinobench.errors import ConfigError
from dinobench.vit import DropPath, ViT, ViTConfig, count_parameters


def small_vit(**kw) -> ViT:
    cfg = dict(image_size=16, grid=4, in_chans=3, dim=32, depth=2, heads=4, mlp_dim=48)
    cfg.update(kw)
    return ViT(ViTConfig(**cfg)).eval()


def test_sdpa_path_equals_explicit_path():
    """The fused path used for training computes what the explicit path computes, for a
    global crop and for a smaller (interpolated) crop."""
    vit = small_vit()
    with torch.no_grad():
        for size in (16, 8):
            x = torch.randn(3, 3, size, size)
            torch.testing.assert_close(vit(x), vit.forward_all_explicit(x), rtol=1e-4,
                                       atol=1e-5)
            feat, _ = vit.forward_with_attention(x)
            torch.testing.assert_close(feat, vit(x), rtol=1e-4, atol=1e-5)


def _layer_norm64(x, weight, bias, eps=1e-6):
    """LayerNorm over the last axis by its definition: biased variance, eps inside."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight.double() + bias.double()


def _linear64(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def _vit_by_hand(vit: ViT, x: torch.Tensor) -> torch.Tensor:
    """The CLS feature of the patch-stem ViT written out in float64 from its parameters:
    patches cut by reshaping and embedded by a matmul; CLS token and positions (bicubic
    F.interpolate for another grid); per block, pre-norm attention with each head's
    softmax(q k^T / sqrt(d)) v computed on its own and the heads concatenated in order,
    then proj, residual, pre-norm MLP (Linear, erf GELU, Linear), residual; final norm."""
    cfg = vit.cfg
    p, D, H = cfg.patch_size, cfg.dim, cfg.heads
    d = D // H
    B, C, Hi, Wi = x.shape
    gh, gw = Hi // p, Wi // p
    patches = (x.double().reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
               .reshape(B, gh * gw, C * p * p))  # row-major over the grid
    w = vit.patch_embed.weight.double().reshape(D, C * p * p)
    t = patches @ w.T + vit.patch_embed.bias.double()
    pe = vit.pos_embed.double()
    if (gh, gw) != (cfg.grid, cfg.grid):
        pe = _interpolated_pos_embed(pe, cfg.grid, gh, gw)
    t = torch.cat([vit.cls_token.double().expand(B, 1, D), t], dim=1) + pe
    for blk in vit.blocks:
        qkv = _linear64(_layer_norm64(t, blk.norm1.weight, blk.norm1.bias), blk.attn.qkv)
        heads = []
        for h in range(H):
            q = qkv[..., h * d:(h + 1) * d]
            k = qkv[..., D + h * d:D + (h + 1) * d]
            v = qkv[..., 2 * D + h * d:2 * D + (h + 1) * d]
            heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
        t = t + _linear64(torch.cat(heads, dim=-1), blk.attn.proj)
        hidden = _linear64(_layer_norm64(t, blk.norm2.weight, blk.norm2.bias), blk.mlp[0])
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        t = t + _linear64(hidden, blk.mlp[2])
    return _layer_norm64(t[:, 0], vit.norm.weight, vit.norm.bias)


def test_forward_equals_a_float64_forward_written_out_by_hand():
    """The whole forward, fused and explicit attention paths, equals a float64 forward
    written out from the model's parameters, on every image, for a global crop and a
    smaller (interpolated) one. Every parameter is redrawn at unit-ish scale first, so
    attention is far from uniform, norms have non-trivial gains and biases, and heads
    hold different values (a mixed-up head merge or a wrong scale shows)."""
    vit = small_vit()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in vit.named_parameters():
            std = 0.3 if name.endswith("weight") and prm.ndim == 2 else 0.5
            prm.copy_(torch.randn(prm.shape, generator=gen) * std)
            if "norm" in name and name.endswith("weight"):
                prm.add_(1.0)  # layer-norm gains around 1
        for size in (16, 8):
            x = torch.randn(3, 3, size, size, generator=gen)
            want = _vit_by_hand(vit, x)
            for got in (vit(x), vit.forward_all_explicit(x), vit.forward_with_attention(x)[0]):
                assert got.shape == (3, vit.cfg.dim) and got.dtype == torch.float32
                for b in range(3):
                    torch.testing.assert_close(got[b].double(), want[b], rtol=1e-5,
                                               atol=1e-5)


def test_attention_weights_match_float64_softmax():
    """The last block's weights equal softmax(q k^T / sqrt(d)) per head and per image,
    computed here in float64 from the block's own qkv projection; rows sum to 1."""
    vit = small_vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, attn = vit.forward_with_attention(x)
        tokens = vit.tokens(x)
        for block in vit.blocks[:-1]:
            tokens, _ = block(tokens)
        last = vit.blocks[-1]
        qkv = last.attn.qkv(last.norm1(tokens)).double()  # (B, N, 3D)
    B, N, _ = qkv.shape
    D, H = vit.cfg.dim, vit.cfg.heads
    d = D // H
    assert attn.shape == (B, H, N, N) and attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, H, N), rtol=0, atol=1e-5)
    for b in range(B):
        for h in range(H):
            q = qkv[b, :, h * d:(h + 1) * d]
            k = qkv[b, :, D + h * d:D + (h + 1) * d]
            want = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            torch.testing.assert_close(attn[b, h].double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hw", [(16, 16), (16, 8)])
def test_cls_attention_maps(hw):
    """cls_attention: (B, heads, gh, gw), each map sums to 1, and cell (r, c) is the CLS
    weight on patch r * gw + c renormalised without the CLS-to-CLS weight."""
    vit = small_vit()
    x = torch.randn(2, 3, *hw)
    gh, gw = hw[0] // 4, hw[1] // 4
    with torch.no_grad():
        maps = vit.cls_attention(x)
        _, attn = vit.forward_with_attention(x)
    assert maps.shape == (2, vit.cfg.heads, gh, gw)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, vit.cfg.heads),
                               rtol=0, atol=1e-5)
    assert torch.all(maps >= 0)
    for h in range(vit.cfg.heads):
        row = attn[1, h, 0].double()
        patch_mass = row[1:].sum()
        for r in range(gh):
            for c in range(gw):
                want = row[1 + r * gw + c] / patch_mass
                assert float(maps[1, h, r, c]) == pytest.approx(float(want), abs=1e-6)


def test_smaller_crop_runs_with_interpolated_positions():
    """A 16x16 crop on the 32-px, grid-8 model keeps the 4-px patch: a 4x4 grid, 17 tokens."""
    vit = ViT(ViTConfig(image_size=32, grid=8, in_chans=3, dim=32, depth=1, heads=2,
                        mlp_dim=32)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert vit.tokens(x).shape == (2, 1 + 16, 32)
    assert vit(x).shape == (2, 32)
    assert vit.cls_attention(x).shape == (2, 2, 4, 4)
    assert vit.pos_embed_for(8, 8) is vit.pos_embed
    pe = vit.pos_embed_for(4, 4)
    assert pe.shape == (1, 17, 32)
    assert torch.equal(pe[:, 0], vit.pos_embed[:, 0])  # CLS position is not resampled


def test_pos_embed_interpolation_keeps_rows_and_columns():
    """With positions that depend on the row only (value = row index, constant over
    columns), the resampled grid is constant along each row and rises down the rows,
    also for a non-square grid: the (h, w) axes are not swapped. A constant grid
    stays constant (bicubic weights sum to 1)."""
    vit = small_vit(dim=8, heads=2)
    g = vit.cfg.grid
    with torch.no_grad():
        rows = torch.arange(g, dtype=torch.float32).view(g, 1).expand(g, g)
        vit.pos_embed[0, 1:] = rows.reshape(g * g, 1).expand(g * g, 8)
        pe = vit.pos_embed_for(2, 6)[0, 1:, 0].reshape(2, 6)
        assert torch.allclose(pe, pe[:, :1].expand(2, 6), atol=1e-6)
        assert pe[1, 0] > pe[0, 0]
        vit.pos_embed[0, 1:] = 0.37
        torch.testing.assert_close(vit.pos_embed_for(3, 5)[0, 1:],
                                   torch.full((15, 8), 0.37), rtol=0, atol=1e-6)


def test_crop_not_a_multiple_of_the_patch_rejected():
    """A crop that patches do not tile is an error, not a silently cropped border."""
    vit = small_vit()
    with pytest.raises(ValueError, match="patch"):
        vit(torch.randn(1, 3, 10, 10))


def expected_parameters(image_size, grid, in_chans, D=192, depth=12, M=768, K=10):
    """Count by formula: patch conv, CLS, positions, blocks, final norm, seed head."""
    p = image_size // grid
    patch = in_chans * p * p * D + D
    tokens = D + (1 + grid * grid) * D
    block = (2 * D) * 2 + (D * 3 * D + 3 * D) + (D * D + D) + (D * M + M) + (M * D + D)
    return patch + tokens + depth * block + 2 * D + (D * K + K)


@pytest.mark.parametrize("image_size,seed_count", [(32, 5.37e6), (96, 5.43e6)])
def test_parameter_counts_match_the_seed(image_size, seed_count):
    """CIFAR-10 (32 px, 4-px patches) and STL-10 (96 px, 12-px patches) with grid 8 and
    the seed head give the seed's 5.37M / 5.43M within 2%, and the exact formula count."""
    cfg = ViTConfig(image_size=image_size, grid=8, in_chans=3)
    n = count_parameters(ViT(cfg)) + count_parameters(SeedHead(192, 10))
    assert n == expected_parameters(image_size, 8, 3)
    assert abs(n - seed_count) / seed_count < 0.02


@pytest.mark.parametrize("kw,flag", [
    (dict(image_size=32, grid=5), "--grid"),
    (dict(image_size=96, grid=7), "--grid"),
    (dict(dim=30, heads=4), "--heads"),
    (dict(image_size=0, grid=1), "image size"),
    (dict(image_size=24, grid=4, stem="conv"), "power of 2"),
    (dict(image_size=16, grid=16, stem="conv"), "power of 2"),
    (dict(stem="convolutional"), "--stem must be one of patch, conv"),
])
def test_bad_vit_config_raises_config_error(kw, flag):
    """Inconsistent shapes are a ConfigError whose message names the flag to change."""
    with pytest.raises(ConfigError, match=flag):
        ViTConfig(**kw)


def test_drop_path_random_in_train_identical_in_eval():
    """Stochastic depth: two training-mode calls differ, eval-mode calls are identical."""
    vit = small_vit(depth=3, drop_path=0.5)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        vit.train()
        outs = [vit(x) for _ in range(4)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:])
        vit.eval()
        assert torch.equal(vit(x), vit(x))
    # The rate rises linearly from 0 in the first block to drop_path in the last.
    assert [b.drop_path.p for b in vit.blocks] == pytest.approx([0.0, 0.25, 0.5])


def test_drop_path_keeps_or_drops_whole_samples():
    """Hand-derived: each sample's branch is either dropped (0) or kept and scaled by
    1 / (1 - p), so the expectation is unchanged."""
    torch.manual_seed(3)
    x = torch.randn(64, 5, 4) + 2.0
    out = DropPath(0.25).train()(x)
    kept = [torch.allclose(out[b], x[b] / 0.75) for b in range(64)]
    dropped = [torch.equal(out[b], torch.zeros_like(x[b])) for b in range(64)]
    assert all(k or d for k, d in zip(kept, dropped))
    assert 0 < sum(dropped) < 64
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_drop_path_one_drops_the_branch_without_nan():
    """drop_path = 1 passes Recipe.validate ([0, 1]); the last block's branches are then
    always dropped, which must give zeros, not 0/0 = NaN."""
    out = DropPath(1.0).train()(torch.ones(4, 3))
    assert torch.equal(out, torch.zeros(4, 3))
    vit = small_vit(drop_path=1.0).train()
    assert torch.isfinite(vit(torch.randn(2, 3, 16, 16))).all()


def _interpolated_pos_embed(pos_embed: torch.Tensor, g: int, gh: int, gw: int):
    """The resize as F.interpolate computes it: bicubic on the (D, g, g) table."""
    grid = pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic",
                                           align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)],
                     dim=1)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("grid,target", [(8, (4, 4)), (8, (6, 6)), (8, (2, 6)), (4, (7, 5)),
                                         (6, (3, 3))])
def test_pos_embed_resize_is_bicubic_interpolate_forward_and_gradient(grid, target, dtype,
                                                                      atol):
    """The matrix resize gives F.interpolate's values and gradients on random tables,
    down- and upsampling, square and not: float32 within rounding, float64 to 1e-13."""
    vit = ViT(ViTConfig(image_size=4 * grid, grid=grid, in_chans=1, dim=16, depth=1,
                        heads=2, mlp_dim=16)).to(dtype)
    with torch.no_grad():
        vit.pos_embed.normal_()
    gh, gw = target
    upstream = torch.randn(1, 1 + gh * gw, 16, dtype=dtype)
    got = vit.pos_embed_for(gh, gw)
    (got * upstream).sum().backward()
    got_grad, vit.pos_embed.grad = vit.pos_embed.grad, None
    want = _interpolated_pos_embed(vit.pos_embed, grid, gh, gw)
    (want * upstream).sum().backward()
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    torch.testing.assert_close(got_grad, vit.pos_embed.grad, rtol=0, atol=10 * atol)


def test_pos_embed_resize_matrix_is_cached_per_grid_device_and_dtype():
    from dinobench.vit import pos_resize_matrix

    cpu = torch.device("cpu")
    a = pos_resize_matrix((8, 8), (4, 4), cpu, torch.float32)
    assert pos_resize_matrix((8, 8), (4, 4), cpu, torch.float32) is a
    assert pos_resize_matrix((8, 8), (4, 4), cpu, torch.float64) is not a
    assert pos_resize_matrix((8, 8), (6, 6), cpu, torch.float32).shape == (36, 64)
    assert a.shape == (16, 64) and not a.requires_grad
    # Each row holds the weights of one output position: they sum to 1.
    torch.testing.assert_close(a.sum(1), torch.ones(16), rtol=0, atol=1e-6)


def test_pos_embed_resize_first_built_under_inference_mode_still_trains():
    """A matrix first built inside inference_mode (evaluation) is an ordinary tensor, so
    a later training step can save it for backward."""
    vit = ViT(ViTConfig(image_size=28, grid=7, in_chans=1, dim=16, depth=1, heads=2,
                        mlp_dim=16))
    with torch.inference_mode():
        vit(torch.randn(2, 1, 12, 12))
    # Weighted, not a plain sum: the sum of a layer norm's output (unit gain, zero bias)
    # does not depend on its input, so its gradient is float rounding, or exactly 0.
    upstream = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    (vit(torch.randn(2, 1, 12, 12)) * upstream).sum().backward()
    # The 3x3 grid's positions are read through the resize matrix from every 7x7 one.
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad[0, 1:].abs().sum(1).min() > 0


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_positional_embeddings_start_at_the_asked_scale(std):
    """--pos-embed-std sets the initial spread of the positional embeddings; the rest of
    the init does not depend on it."""
    cfg = ViTConfig(image_size=32, grid=8, in_chans=1, dim=64, depth=1, heads=2, mlp_dim=64,
                    pos_embed_std=std)
    torch.manual_seed(0)
    vit = ViT(cfg)
    pe = vit.pos_embed.detach()
    assert abs(pe.std().item() - std) < 0.05 * std
    torch.manual_seed(0)
    other = ViT(dataclasses.replace(cfg, pos_embed_std=0.02))
    assert torch.equal(vit.patch_embed.weight, other.patch_embed.weight)


def test_positional_embedding_scale_must_be_positive():
    with pytest.raises(ConfigError, match="pos-embed-std"):
        ViTConfig(pos_embed_std=0.0)


# --- the convolutional stem ----------------------------------------------------------


@pytest.mark.parametrize("image_size,grid", [(16, 4), (32, 4), (32, 16)])
def test_conv_stem_token_sees_its_patch_and_its_neighbours_pixels(image_size, grid):
    """Each of the n = log2(p) 3x3 stride-2 convolutions (padding 1) widens the reach by
    one pixel of its input on each side, so by hand: token i sees input pixels
    p*i - (p - 1) .. p*i + (p - 1). Changing one pixel changes exactly the tokens whose
    reach holds it (the norm is per position and mixes no positions); the patch
    embedding, by contrast, changes only the pixel's own patch."""
    p = image_size // grid
    torch.manual_seed(0)
    conv = small_vit(image_size=image_size, grid=grid, stem="conv").double()
    patch = small_vit(image_size=image_size, grid=grid).double()
    x = torch.randn(1, 3, image_size, image_size, dtype=torch.float64)
    for py, px in ((0, 0), (p, p - 1), (image_size - 1, image_size // 2)):
        y = x.clone()
        y[0, :, py, px] += 1.0
        # Token i reaches input pixels p*i + lo .. p*i + hi.
        for vit, (lo, hi) in ((conv, (-(p - 1), p - 1)), (patch, (0, p - 1))):
            with torch.no_grad():
                moved = (vit.patch_embed(y) - vit.patch_embed(x)).abs().amax(1)[0] > 1e-9
            start = p * torch.arange(grid)
            sees_y = (start + lo <= py) & (py <= start + hi)
            sees_x = (start + lo <= px) & (px <= start + hi)
            assert torch.equal(moved, sees_y[:, None] & sees_x[None, :]), (vit.cfg.stem, py, px)


def test_conv_stem_features_do_not_depend_on_the_batch():
    """Layer norm, not batch norm: an image's CLS feature is the same alone or in a
    batch, in training mode too (the k-NN reads features one image at a time)."""
    torch.manual_seed(0)
    vit = small_vit(stem="conv").train()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        together = vit(x)
        alone = torch.cat([vit(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_conv_stem_shapes_and_widths():
    """Patch 8 takes three convolutions with D/8, D/4, D/2 channels, then a 1x1 to D; a
    local crop of half the side gives a grid of half the side, as the patch embedding."""
    vit = small_vit(image_size=32, grid=4, dim=64, stem="conv")
    assert [c.out_channels for c in vit.patch_embed.convs] == [8, 16, 32]
    assert vit.patch_embed.proj.out_channels == 64
    assert vit.tokens(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 16, 64)
    assert vit.tokens(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 64)
    assert vit.cls_attention(torch.randn(2, 3, 32, 32)).shape == (2, 4, 4, 4)


def test_conv_stem_trains_and_decays_only_its_convolutions(tiny_recipe, tiny_vit_cfg):
    """One DINO step through the conv stem, on global and local crops: every stem
    parameter moves, and weight decay takes the convolutions' kernels (matrices) but not
    their norms."""
    from dinobench.dino.model_setup import param_groups
    from dinobench.dino.multicrop import MultiCropConfig
    from dinobench.dino.train import DINOTrainer

    recipe = tiny_recipe.replace(stem="conv")
    cfg = ViTConfig.for_recipe(recipe, 16, 4, 1)
    assert cfg.stem == "conv" and dataclasses.replace(tiny_vit_cfg, stem="conv") == cfg
    crop = MultiCropConfig.from_recipe(recipe, 16, 4, (0.5,), (0.25,))
    trainer = DINOTrainer(recipe, cfg, crop, seed=0, progress=False, log=lambda m: None)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    out = trainer.step(images, torch.Generator().manual_seed(1), lr=1e-2, wd=0.04,
                       momentum=0.9, teacher_temp=0.04, freeze_last_layer=False)
    assert math.isfinite(out["loss"].item())
    stem = {n: p for n, p in trainer.student.named_parameters()
            if n.startswith("backbone.patch_embed.")}
    assert len(stem) == 2 + 2 * 2 + 2  # two kernels, two norms (weight, bias), the 1x1
    for name, p in stem.items():
        assert not torch.equal(p, before[name]), name
    decayed = {id(p) for g in param_groups(trainer.student) if g["decay"] for p in g["params"]}
    assert {n for n, p in stem.items() if id(p) in decayed} == {
        "backbone.patch_embed.convs.0.weight", "backbone.patch_embed.convs.1.weight",
        "backbone.patch_embed.proj.weight"}


def test_resume_identity_names_the_stem_only_when_it_is_not_the_patch():
    """Checkpoints written before --stem existed record a ViT without it; they must still
    match the patch embedding, and a conv-stem run must not match them."""
    from dinobench.run import vit_identity

    assert "stem" not in vit_identity(ViTConfig())
    assert vit_identity(ViTConfig(stem="conv"))["stem"] == "conv"
    assert (set(vit_identity(ViTConfig())) | {"stem", "mask_token"}
            == set(ViTConfig.__dataclass_fields__))
