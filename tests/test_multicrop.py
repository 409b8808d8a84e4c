"""Batched multi-crop (DINO Sec. 3.1): crop boxes, geometry on images whose pixels encode
their position, colour operations against torchvision, blur against a float64 loop."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dinobench.config import OFFICIAL, SEED
from dinobench.dino.multicrop import (
    MultiCrop,
    MultiCropConfig,
    colour_jitter,
    gaussian_blur,
    sample_boxes,
    shift_hue,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def plain(channels=3, **kw) -> MultiCropConfig:
    """No photometric randomness: geometry only, unless a test turns something on."""
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.5,) * channels, (0.25,) * channels)
    cfg = dict(global_size=16, local_size=8, mean=mean, std=std, n_global=2, n_local=0,
               flip_p=0.0, jitter_p=0.0, grey_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    cfg.update(kw)
    return MultiCropConfig(**cfg)


def normalised(images_uint8, cfg):
    """(x / 255 - mean) / std in float64."""
    x = images_uint8.double() / 255.0
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, -1, 1, 1)
    return (x - mean) / std


def unnormalised(crops, cfg):
    """Back to [0, 1] units, float64."""
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, -1, 1, 1)
    return crops.double() * std + mean


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- crop boxes ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0), (0.5, 0.5)])
def test_sample_boxes_scale_ratio_and_bounds(scale):
    """Area w*h in the scale range, aspect w/h in [3/4, 4/3] (or the whole image when no
    try fits), every box inside the unit square."""
    b = sample_boxes(4000, scale, (3 / 4, 4 / 3), gen(), "cpu").double()
    w, h, left, top = b.unbind(1)
    whole = (w == 1) & (h == 1)
    area, aspect = w * h, w / h
    eps = 1e-5
    assert torch.all(((area >= scale[0] - eps) & (area <= scale[1] + eps)) | whole)
    assert torch.all((aspect >= 0.75 - eps) & (aspect <= 4 / 3 + eps))
    assert torch.all((left >= 0) & (top >= 0))
    assert torch.all((left + w <= 1 + eps) & (top + h <= 1 + eps))


def test_sample_boxes_span_the_ranges():
    """The draws are spread over the whole range, not a constant: area uniform in the
    scale range (mean half-way), aspect near both ends, positions spread."""
    b = sample_boxes(4000, (0.05, 0.4), (3 / 4, 4 / 3), gen(1), "cpu").double()
    w, h, left, top = b.unbind(1)
    area, aspect = w * h, w / h
    assert area.min() < 0.06 and area.max() > 0.39
    assert abs(area.mean().item() - 0.225) < 0.01  # uniform on [0.05, 0.4]
    assert aspect.min() < 0.77 and aspect.max() > 1.30
    assert abs(aspect.log().mean().item()) < 0.01  # log-uniform, symmetric about 1
    assert left.std() > 0.05 and top.std() > 0.05
    assert left.max() > 0.5 and top.max() > 0.5


def test_scale_one_is_the_whole_image():
    """Area 1 cannot fit with any aspect but 1, so every box falls back to the image."""
    b = sample_boxes(100, (1.0, 1.0), (3 / 4, 4 / 3), gen(), "cpu")
    torch.testing.assert_close(b, torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(100, 4))


# --- geometry on known images -----------------------------------------------------------


def ramp_rgb(B=2, size=16):
    """A horizontal ramp, different per channel (R rises, G falls, B constant)."""
    x = torch.arange(size) * (255 // (size - 1))
    img = torch.stack([x.view(1, -1).expand(size, size),
                       (255 - x).view(1, -1).expand(size, size),
                       torch.full((size, size), 90)])
    return img.to(torch.uint8).unsqueeze(0).expand(B, -1, -1, -1).contiguous()


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_full_crop_and_flip_on_a_ramp(flip_p):
    """Hand-derived: scale (1, 1) at the image's own size is the identity resample, so
    the global crop is the normalised image, mirrored left-right when flip_p=1."""
    images = ramp_rgb()
    cfg = plain(global_scale=(1.0, 1.0), flip_p=flip_p)
    (g,) = MultiCrop(cfg)(images, gen())
    want = normalised(images, cfg)
    if flip_p:
        want = want.flip(-1)
    assert g.shape == (4, 3, 16, 16) and g.dtype == torch.float32
    torch.testing.assert_close(g.double(), torch.cat([want, want]), rtol=0, atol=1e-5)


def test_solarisation_on_known_values():
    """solarize_p=1: pixels >= 128 become 255 - v on the second global view only; the
    first global view and the local views keep them."""
    values = torch.tensor([0, 1, 64, 127, 128, 129, 200, 255], dtype=torch.uint8)
    images = values.repeat(8).view(1, 1, 8, 8).repeat(2, 1, 1, 1)
    cfg = plain(channels=1, global_size=8, local_size=8, n_local=2, global_scale=(1.0, 1.0),
                local_scale=(1.0, 1.0), solarize_p=1.0)
    g, loc = MultiCrop(cfg)(images, gen())
    x = images.double() / 255.0
    solarised = torch.where(images >= 128, (255 - images).double() / 255.0, x)
    torch.testing.assert_close(unnormalised(g[:2], cfg), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(unnormalised(g[2:], cfg), solarised, rtol=0, atol=1e-6)
    torch.testing.assert_close(unnormalised(loc, cfg), torch.cat([x, x]), rtol=0, atol=1e-6)


def test_greyscale_gives_equal_channels_equal_to_luma():
    """grey_p=1: every channel carries the luma 0.299 R + 0.587 G + 0.114 B."""
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    cfg = plain(global_size=8, global_scale=(1.0, 1.0), grey_p=1.0)
    (g,) = MultiCrop(cfg)(images, gen())
    x = unnormalised(g, cfg)
    rgb = images.double() / 255.0
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.cat([luma, luma]), rtol=0, atol=1e-5)


def test_local_crops_cut_from_their_global_crop():
    """local_from_global: on an image whose channel 0 encodes x and channel 1 encodes y,
    local crop j of an image only holds positions inside global crop j mod n_global of the
    same image. Without local_from_global the same check fails (it can detect a crop
    taken from the image instead)."""
    B, size = 6, 32
    xs = (torch.arange(size) * 8).view(1, -1).expand(size, size)
    images = torch.stack([xs, xs.T]).to(torch.uint8).unsqueeze(0).repeat(B, 1, 1, 1)

    def outside(local_from_global):
        cfg = plain(channels=2, n_local=4, global_scale=(0.5, 0.5), local_scale=(0.05, 0.4),
                    flip_p=0.5, local_from_global=local_from_global)
        g, loc = MultiCrop(cfg)(images, gen(5))
        g = unnormalised(g, cfg) * 255
        loc = unnormalised(loc, cfg) * 255
        # Half a global pixel, in ramp units, at the widest possible global crop.
        tol = 8 * (size / cfg.global_size) / 2 + 1e-3
        worst = 0.0
        for j in range(cfg.n_local):
            for b in range(B):
                parent = g[(j % cfg.n_global) * B + b]
                child = loc[j * B + b]
                for c in range(2):
                    lo, hi = parent[c].min(), parent[c].max()
                    worst = max(worst, float(lo - child[c].min()), float(child[c].max() - hi))
        return worst, tol

    worst, tol = outside(True)
    assert worst <= tol
    worst_image, tol = outside(False)
    assert worst_image > tol


def test_crop_major_order():
    """Crop 0 of every image comes first, then crop 1...: with constant images of distinct
    values, row c * B + b holds image b's value for every crop c."""
    B = 5
    values = torch.tensor([10, 60, 110, 160, 210], dtype=torch.uint8)
    images = values.view(B, 1, 1, 1).expand(B, 1, 12, 12).contiguous()
    cfg = plain(channels=1, global_size=12, local_size=6, n_local=3, flip_p=0.5)
    g, loc = MultiCrop(cfg)(images, gen())
    assert g.shape == (2 * B, 1, 12, 12) and loc.shape == (3 * B, 1, 6, 6)
    want = (values.double() / 255 - 0.5) / 0.25
    for crops, n in ((g, 2), (loc, 3)):
        for c in range(n):
            for b in range(B):
                assert torch.allclose(crops[c * B + b].double(), want[b], atol=1e-5)


# --- colour ---------------------------------------------------------------------------


def test_shift_hue_matches_torchvision():
    """An independent implementation: torchvision's adjust_hue, per sample, with a
    different shift for each sample (including grey pixels, ties and the ends +-0.5)."""
    shifts = torch.tensor([-0.5, -0.27, -0.1, 0.05, 0.2, 0.5])
    x = torch.rand(6, 3, 5, 5)
    x[:, :, 0, 0] = 0.5  # grey: hue undefined, must stay grey
    x[:, 0, 1, 1] = x[:, 1, 1, 1]  # red == green
    x[:, :, 2, 2] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3)  # pure red
    got = shift_hue(x, shifts)
    want = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_shift_hue_zero_is_identity():
    x = torch.rand(4, 3, 6, 6)
    torch.testing.assert_close(shift_hue(x, torch.zeros(4)), x, rtol=0, atol=1e-6)


def test_brightness_jitter_scales_each_sample():
    """Brightness only, p=1: each sample is its input times one factor in [0.6, 1.4]
    (inputs kept below 0.7 so nothing clips), and factors differ between samples."""
    x = 0.05 + 0.65 * torch.rand(16, 3, 4, 4)
    out = colour_jitter(x, (0.4, 0.0, 0.0, 0.0), 1.0, gen())
    ratio = (out.double() / x.double()).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=0, atol=1e-5)
    assert ratio.min() >= 0.6 - 1e-6 and ratio.max() <= 1.4 + 1e-6
    assert ratio[:, 0].std() > 0.05


# --- blur -----------------------------------------------------------------------------


def reference_blur(plane, sigma, radius):
    """Float64 separable Gaussian on one (H, W) plane, reflect padding, explicit loops."""
    a = plane.double().numpy()
    taps = [math.exp(-0.5 * (o / sigma) ** 2) for o in range(-radius, radius + 1)]
    taps = [t / sum(taps) for t in taps]
    H, W = a.shape
    rows = np.pad(a, ((0, 0), (radius, radius)), mode="reflect")
    tmp = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            tmp[i, j] = sum(taps[k] * rows[i, j + k] for k in range(2 * radius + 1))
    cols = np.pad(tmp, ((radius, radius), (0, 0)), mode="reflect")
    out = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            out[i, j] = sum(taps[k] * cols[i + k, j] for k in range(2 * radius + 1))
    return torch.from_numpy(out)


def test_blur_matches_float64_reference_per_sample():
    """Each sample uses its own sigma (two samples, three channels each)."""
    x = torch.rand(2, 3, 9, 11)
    sigma = torch.tensor([0.8, 1.7])
    out = gaussian_blur(x, sigma, radius=3)
    for n in range(2):
        for c in range(3):
            want = reference_blur(x[n, c], float(sigma[n]), 3)
            torch.testing.assert_close(out[n, c].double(), want, rtol=0, atol=1e-5)


def test_blur_tiny_sigma_is_identity_and_constant_is_kept():
    """A vanishing sigma leaves the image as it is; the normalised kernel keeps a
    constant image constant (reflect padding adds no dark border)."""
    x = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(gaussian_blur(x, torch.full((3,), 1e-3), 2), x)
    const = torch.full((2, 1, 8, 8), 0.42)
    out = gaussian_blur(const, torch.tensor([1.0, 3.0]), 4)
    torch.testing.assert_close(out, const, rtol=0, atol=1e-6)


# --- the whole pipeline ----------------------------------------------------------------


def full_cfg(channels=3):
    return MultiCropConfig.from_recipe(OFFICIAL.replace(n_local=3), global_size=16,
                                       patch_size=4, mean=(0.5,) * channels,
                                       std=(0.25,) * channels)


def test_from_recipe_local_size_is_whole_patches():
    """A local crop keeps the patch size: half of a 32-px crop with 4-px patches is 16
    px, half of a 96-px crop with 12-px patches is 48 px; recipe fields carry over."""
    cfg = MultiCropConfig.from_recipe(SEED, 32, 4, MEAN3, STD3)
    assert (cfg.global_size, cfg.local_size) == (32, 16)
    assert cfg.local_from_global and cfg.global_scale == (0.5, 1.0)
    assert MultiCropConfig.from_recipe(OFFICIAL, 96, 12, MEAN3, STD3).local_size == 48


def test_reproducible_with_the_same_seed():
    """The full augmentation is a function of the generator's seed."""
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mc = MultiCrop(full_cfg())
    a, b, c = mc(images, gen(7)), mc(images, gen(7)), mc(images, gen(8))
    assert a[0].shape == (8, 3, 16, 16) and a[1].shape == (12, 3, 8, 8)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in a)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_single_channel_skips_colour(monkeypatch):
    """1-channel data (MNIST) runs with the full recipe without any colour op: the
    colour functions are never called, and the crops are bit-equal, for the same seed,
    to those of the same recipe with colour jitter and greyscale turned off (so no
    colour randomness is drawn or applied either)."""
    import dinobench.dino.multicrop as mc_module

    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    cfg = full_cfg(1)
    assert cfg.jitter_p > 0 and cfg.grey_p > 0
    no_colour = dataclasses.replace(cfg, jitter_p=0.0, grey_p=0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("colour op called on 1-channel images")

    for name in ("colour_jitter", "grey", "shift_hue"):
        monkeypatch.setattr(mc_module, name, refuse)
    g, loc = MultiCrop(cfg)(images, gen())
    want_g, want_loc = MultiCrop(no_colour)(images, gen())
    assert g.shape == (8, 1, 16, 16) and loc.shape == (12, 1, 8, 8)
    assert torch.isfinite(g).all() and torch.isfinite(loc).all()
    assert torch.equal(g, want_g) and torch.equal(loc, want_loc)


def test_bad_input_rejected():
    """Float input or a channel count that the normalisation does not cover is an error."""
    mc = MultiCrop(full_cfg())
    with pytest.raises(ValueError, match="uint8"):
        mc(torch.rand(2, 3, 16, 16), gen())
    with pytest.raises(ValueError, match="channels"):
        mc(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), gen())


@pytest.mark.gpu
@requires_cuda
def test_cuda_multicrop():
    """Same pipeline on CUDA with a CUDA generator: shapes, device, reproducibility,
    crop-major order on constant images, and the flip on a ramp."""
    dev = torch.device("cuda")
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, device=dev)
    mc = MultiCrop(full_cfg())
    a = mc(images, torch.Generator(dev).manual_seed(3))
    b = mc(images, torch.Generator(dev).manual_seed(3))
    assert a[0].device.type == "cuda" and a[0].shape == (8, 3, 16, 16)
    assert a[1].shape == (12, 3, 8, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.isfinite(t).all() for t in a)

    values = torch.tensor([10, 90, 170, 250], dtype=torch.uint8, device=dev)
    const = values.view(4, 1, 1, 1).expand(4, 1, 12, 12).contiguous()
    cfg = plain(channels=1, global_size=12, local_size=6, n_local=2, flip_p=0.5)
    g, loc = MultiCrop(cfg)(const, torch.Generator(dev).manual_seed(0))
    want = ((values.double() / 255 - 0.5) / 0.25).cpu()
    for crops, n in ((g, 2), (loc, 2)):
        per_row = crops.double().cpu().flatten(1)
        for c in range(n):
            torch.testing.assert_close(per_row[c * 4:(c + 1) * 4].mean(1), want, atol=1e-5,
                                       rtol=0)

    ramp = ramp_rgb().to(dev)
    cfg = plain(global_scale=(1.0, 1.0), flip_p=1.0)
    (g,) = MultiCrop(cfg)(ramp, torch.Generator(dev).manual_seed(0))
    want = normalised(ramp.cpu(), cfg).flip(-1)
    torch.testing.assert_close(g.double().cpu(), torch.cat([want, want]), rtol=0, atol=1e-5)
