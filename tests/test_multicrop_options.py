"""The multi-crop's two reference-pipeline options: colour jitter in a random order per
image (torchvision's ``ColorJitter``) and antialiased crops (PIL's filtered resize).

Colour is checked against torchvision's functional operations, applied one sample at a
time in the order the sample drew; antialiasing against average pooling in float64 and
against a pattern that plain bilinear sampling aliases."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.multicrop import (
    MultiCrop,
    MultiCropConfig,
    colour_jitter,
    resample,
    supersampling,
)

STRENGTH = (0.9, 0.9, 0.9, 0.5)  # strong enough that clipping and hue make order matter


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def torchvision_jitter(x, fb, fc, fs, hue, order):
    """One image ``(3, H, W)`` through torchvision's functional colour operations in
    ``order`` (indices into brightness, contrast, saturation, hue)."""
    ops = (lambda y: TF.adjust_brightness(y, fb), lambda y: TF.adjust_contrast(y, fc),
           lambda y: TF.adjust_saturation(y, fs), lambda y: TF.adjust_hue(y, hue))
    for j in order:
        x = ops[j](x)
    return x


def drawn_factors(seed, n, random_order):
    """The factors and orders colour_jitter draws from ``gen(seed)`` with p = 1: one
    uniform per sample for 'apply', four per sample for the factors, then (random order)
    four per sample whose ranks give the permutation."""
    g = gen(seed)
    torch.rand(n, generator=g)  # apply (all, with p = 1)
    u = torch.rand(4, n, generator=g)
    factors = [1 - s + 2 * s * u[i] for i, s in enumerate(STRENGTH[:3])]
    hue = (2 * u[3] - 1) * STRENGTH[3]
    perm = torch.rand(n, 4, generator=g).argsort(dim=1) if random_order else \
        torch.arange(4).expand(n, 4)
    return factors, hue, perm


@pytest.mark.parametrize("random_order", [False, True])
def test_jitter_matches_torchvision_in_each_samples_order(random_order):
    n = 48
    x = torch.rand(n, 3, 6, 6)
    out = colour_jitter(x, STRENGTH, 1.0, gen(3), random_order=random_order)
    (fb, fc, fs), hue, perm = drawn_factors(3, n, random_order)
    for i in range(n):
        want = torchvision_jitter(x[i], float(fb[i]), float(fc[i]), float(fs[i]),
                                  float(hue[i]), perm[i].tolist())
        # torchvision's luma weights are 0.2989/0.587/0.114 against ITU-R 601's 0.299.
        torch.testing.assert_close(out[i], want, rtol=0, atol=2e-3)


def test_random_order_draws_many_orders_and_changes_the_result():
    """Many of the 24 orders occur, and the result is not the fixed order's: the same
    factors in another order give another image wherever clipping or hue intervene."""
    n = 64
    x = torch.rand(n, 3, 6, 6)
    _, _, perm = drawn_factors(5, n, True)
    assert len({tuple(p.tolist()) for p in perm}) >= 12
    fixed = colour_jitter(x, STRENGTH, 1.0, gen(5))
    shuffled = colour_jitter(x, STRENGTH, 1.0, gen(5), random_order=True)
    moved = (shuffled - fixed).abs().flatten(1).amax(dim=1)
    assert (moved > 0.02).sum() >= n // 4


def test_random_order_keeps_p_zero_the_identity():
    x = torch.rand(8, 3, 5, 5)
    torch.testing.assert_close(colour_jitter(x, STRENGTH, 0.0, gen(), random_order=True), x,
                               rtol=0, atol=1e-6)


# --- antialiasing ----------------------------------------------------------------------


@pytest.mark.parametrize("side,size,scale,ratio,k", [
    (32, 16, (0.2, 0.5), (3 / 4, 4 / 3), 2),  # small's local crops on MNIST: 26.1 px -> 16
    (32, 32, (0.5, 1.0), (3 / 4, 4 / 3), 1),  # its global crops never shrink
    (32, 16, (0.05, 0.4), (3 / 4, 4 / 3), 2),  # official's locals: 23.4 px -> 16
    (96, 16, (0.05, 0.4), (3 / 4, 4 / 3), 5),  # 70.1 px -> 16: 4.38, rounded up
    (32, 8, (1.0, 1.0), (1.0, 1.0), 4),  # the whole image, exactly 4x
])
def test_supersampling_is_the_largest_shrink_rounded_up(side, size, scale, ratio, k):
    assert supersampling(side, size, scale, ratio) == k


@pytest.mark.parametrize("k", [2, 4])
def test_whole_image_shrunk_k_times_is_average_pooling(k):
    """The identity crop of a 32-px image into 32/k px, supersampled k times, is the mean
    of each k x k block: the box filter, computed here in float64."""
    images = torch.rand(3, 2, 32, 32)
    theta = torch.eye(3).expand(1, 3, 3, 3)
    got = resample(images, theta, 32 // k, supersample=k)[0]
    want = F.avg_pool2d(images.double(), k)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_antialiasing_removes_the_moire_of_a_shrunk_grating():
    """Vertical stripes one pixel wide, shrunk by 1.6: plain bilinear sampling turns them
    into a false low-frequency pattern; averaged over each output pixel they are close
    to flat grey."""
    stripes = (torch.arange(32) % 2).float().expand(1, 1, 32, 32).contiguous()
    theta = torch.eye(3).expand(1, 1, 3, 3)
    plain = resample(stripes, theta, 20)[0, 0, 0]
    smooth = resample(stripes, theta, 20, supersample=supersampling(32, 20, (1, 1), (1, 1)))
    smooth = smooth[0, 0, 0]
    assert plain.std() > 0.25
    assert smooth.std() < 0.5 * plain.std()
    torch.testing.assert_close(smooth.mean(), torch.tensor(0.5), rtol=0, atol=0.05)


def test_multicrop_antialias_changes_only_the_shrunk_crops():
    """With the same generator, antialiasing leaves the 32-px global crops of a 32-px
    image as they were (k = 1) and low-passes the local ones (k = 2)."""
    cfg = MultiCropConfig.from_recipe(SMALL.for_dataset(False), 32, 8, (0.5,), (0.25,))
    images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    plain = MultiCrop(cfg)(images, gen(1))
    aa_cfg = MultiCropConfig.from_recipe(
        SMALL.replace(antialias=True).for_dataset(False), 32, 8, (0.5,), (0.25,))
    aa = MultiCrop(aa_cfg)(images, gen(1))
    assert torch.equal(plain[0], aa[0])
    assert aa[1].shape == plain[1].shape and not torch.allclose(aa[1], plain[1])
    # Low-passed noise: neighbouring pixels of the local crops vary less.
    assert aa[1].diff(dim=-1).abs().mean() < plain[1].diff(dim=-1).abs().mean()


# --- recipe fields ---------------------------------------------------------------------


def test_recipe_rejects_an_unknown_jitter_order():
    with pytest.raises(ConfigError, match="--jitter-order must be one of fixed, random"):
        SMALL.replace(jitter_order="shuffled").validate()


def test_resume_identity_leaves_out_the_new_fields_at_their_defaults():
    """A checkpoint written before the options existed records a recipe without them; it
    must match a recipe that leaves them at their defaults, and no other."""
    assert "jitter_order" not in recipe_identity(SMALL)
    assert "antialias" not in recipe_identity(SMALL)
    assert recipe_identity(SMALL.replace(antialias=True))["antialias"] is True
    assert recipe_identity(SMALL.replace(jitter_order="random"))["jitter_order"] == "random"
    later = ["jitter_order", "antialias", "rotation", "stroke_p", "koleo_weight", "stem",
             "elastic", "dino_weight", "ibot_weight", "ibot_mask_ratio", "ibot_mask_p",
             "koleo_weight_end", "norm_last_layer", "align_weight", "elastic_points"]
    full = set(itertools.chain(recipe_identity(SMALL), later))
    assert full == set(SMALL.__dataclass_fields__)
