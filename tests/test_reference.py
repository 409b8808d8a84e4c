"""The reference pipeline of ``dinobench bench --compare``: crop shapes and order, the
explicit attention path, its own weight-decay rule and positional-embedding resize (the
DINO code's), the same step as dinobench once those two are aligned, and its loader."""

from __future__ import annotations

import copy

import pytest
import torch

from dinobench import reference
from dinobench.dino.train import DINOTrainer
from dinobench.vit import ViT, ViTConfig
from helpers import tiny_setup


@pytest.mark.parametrize("channels", [1, 3])
def test_reference_crops_have_the_recipe_shapes_and_normalisation(channels):
    _, _, crop = tiny_setup(channels=channels, jitter_p=0.0, grey_p=0.0, blur_p=(0.0, 0.0, 0.0),
                       solarize_p=0.0)
    images = torch.full((2, channels, 32, 32), 128, dtype=torch.uint8)
    crops = reference.ReferenceDataset(images, reference.ReferenceMultiCrop(crop, channels))[1]
    assert [tuple(c.shape) for c in crops] == ([(channels, 32, 32)] * 2
                                               + [(channels, 16, 16)] * 4)
    for c in crops:  # a flat image stays flat: ToTensor then Normalize(0.5, 0.25)
        assert c.dtype == torch.float32
        torch.testing.assert_close(c, torch.full_like(c, (128 / 255 - 0.5) / 0.25))


def test_reference_loader_batches_are_crop_major():
    _, _, crop = tiny_setup(jitter_p=0.0, grey_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    values = torch.arange(8, dtype=torch.uint8) * 30  # one flat grey level per image
    images = values.view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    loader = reference.make_loader(images, crop, 4, workers=0)
    glob, local = reference.to_model_input(next(iter(loader)), crop.n_global,
                                           torch.device("cpu"))
    assert glob.shape == (2 * 4, 3, 32, 32) and local.shape == (4 * 4, 3, 16, 16)
    level = glob[:, 0, 0, 0]
    # Crop v of image b sits at row v * B + b: each view block holds the same images.
    torch.testing.assert_close(level[:4], level[4:])
    torch.testing.assert_close(local[:, 0, 0, 0].view(4, 4), level[:4].expand(4, 4))


def test_reference_model_takes_the_explicit_attention_path(monkeypatch):
    cfg = ViTConfig(image_size=32, grid=8, in_chans=3, dim=32, depth=2, heads=2, mlp_dim=64)
    torch.manual_seed(0)
    fused = ViT(cfg).eval()
    explicit = reference.use_explicit_attention_(ViT(cfg).eval())
    explicit.load_state_dict(fused.state_dict())  # same names, same values
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(explicit(x), fused(x), rtol=1e-4, atol=1e-5)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("fused attention called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_sdpa)
    explicit(x)  # never reaches the fused kernel
    with pytest.raises(AssertionError, match="fused attention"):
        fused(x)


def _same_start(**reference_kw):
    """A dinobench trainer and a reference trainer from the same initialisation (no
    stochastic depth), the reference fed the crops dinobench's step draws."""
    recipe, cfg, crop = tiny_setup("official", drop_path=0.0)
    ours = DINOTrainer(recipe, cfg, crop, seed=3, progress=False, log=lambda s: None)
    ref = reference.ReferenceTrainer(recipe, cfg, device="cpu", seed=3, **reference_kw)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    crops = ours.multicrop(images, torch.Generator().manual_seed(1))
    ours.multicrop = lambda batch, gen: crops
    return ours, ref, images, crops


# A weight decay large enough that decaying a tensor or not moves it by far more than
# the tolerance below (lr * wd * |p| against 0.02 * lr).
SAME_MATH_KW = {"lr": 1e-3, "wd": 10.0, "momentum": 0.9, "teacher_temp": 0.05,
                "freeze_last_layer": False}


def _assert_same_update(name: str, a: torch.Tensor, b: torch.Tensor, lr: float) -> None:
    """Adam's first update is about lr * sign(grad) everywhere, so a different optimizer,
    lr or gradient moves a weight by about lr; equal steps agree to 0.02 lr. The key bias
    is left out: softmax ignores it, its gradient is rounding noise (two ways of rounding
    give two noises), so Adam moves it by an arbitrary fraction of lr either way."""
    if name.endswith("attn.qkv.bias"):
        keys = torch.zeros_like(a, dtype=torch.bool).view(3, -1)
        keys[1] = True
        a, b = a[~keys.view(-1)], b[~keys.view(-1)]
    torch.testing.assert_close(a, b, rtol=0, atol=0.02 * lr, msg=name)


def test_reference_step_is_the_same_math_as_dinobench():
    # With the reference set to dinobench's two deliberate choices (positional-embedding
    # resize to the exact grid, no decay on the CLS token and positions), one step on the
    # same crops gives the same loss and the same student (fp32 on a CPU).
    ours, ref, images, crops = _same_start(pos_embed="size", decay_embeddings=False)
    kw = SAME_MATH_KW
    loss = ours.step(images, None, **kw)["loss"]
    assert ref.step(crops, **kw) == pytest.approx(float(loss), rel=1e-5)
    for (name, a), b in zip(ours.student.named_parameters(), ref.student.parameters()):
        _assert_same_update(name, a, b, kw["lr"])
    torch.testing.assert_close(ours.center, ref.center)


def test_reference_decays_the_embeddings_as_the_dino_code_does():
    """Decay on everything but biases and 1-D tensors: after one step from the same start
    only the CLS token and the positional embeddings differ, by the decay lr * wd * p."""
    ours, ref, images, crops = _same_start(pos_embed="size")  # decay_embeddings: default
    names = [n for n, _ in ref.student.named_parameters()]
    decayed = {names[i] for i, p in enumerate(ref.student.parameters())
               if any(p is q for q in ref.optimizer.param_groups[0]["params"])}
    assert decayed == {n for n, p in ref.student.named_parameters()
                       if not n.endswith(".bias") and p.ndim > 1}
    assert {"backbone.cls_token", "backbone.pos_embed"} <= decayed
    kw = SAME_MATH_KW
    before = {n: p.detach().clone() for n, p in ref.student.named_parameters()}
    ours.step(images, None, **kw)
    ref.step(crops, **kw)
    for (name, a), b in zip(ours.student.named_parameters(), ref.student.parameters()):
        if name in ("backbone.cls_token", "backbone.pos_embed"):
            torch.testing.assert_close(a - b, kw["lr"] * kw["wd"] * before[name], rtol=1e-3,
                                       atol=0.02 * kw["lr"], msg=name)
        else:
            _assert_same_update(name, a, b, kw["lr"])


def test_reference_pos_embed_formulas():
    """The official resize (a scale factor with 0.1 added) samples other points than the
    resize to the exact grid; "size" is dinobench's values; the full grid is untouched."""
    cfg = ViTConfig(image_size=32, grid=8, in_chans=3, dim=16, depth=1, heads=2, mlp_dim=16)
    vit = ViT(cfg)
    with torch.no_grad():
        vit.pos_embed.normal_()
    ref = reference.use_reference_pos_embed_(copy.deepcopy(vit), "official")
    exact = reference.use_reference_pos_embed_(copy.deepcopy(vit), "size")
    with torch.no_grad():
        official, size, ours = (m.pos_embed_for(4, 4) for m in (ref, exact, vit))
        assert ref.pos_embed_for(8, 8) is ref.pos_embed
    torch.testing.assert_close(size, ours, rtol=0, atol=1e-5)
    assert torch.equal(official[:, 0], ours[:, 0])  # the CLS position is not resampled
    assert (official - ours).abs().max() > 0.05  # a different formula, not rounding
    with pytest.raises(ValueError, match="pos_embed"):
        reference.use_reference_pos_embed_(vit, "bilinear")


def test_reference_loader_starts_its_workers_with_forkserver():
    _, _, crop = tiny_setup()
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    loader = reference.make_loader(images, crop, 4, workers=1, prefetch_factor=1)
    assert loader.prefetch_factor == 1 and loader.persistent_workers
    method = loader.multiprocessing_context
    assert method is not None and method.get_start_method() == "forkserver"
    assert reference.make_loader(images, crop, 4, workers=0).multiprocessing_context is None
