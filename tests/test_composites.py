"""MNIST composites: exact masks, the blend formula, seeded layouts, clear errors."""


import numpy as np
import pytest
import torch

from dinobench.data.composites import (
    composite,
    composite_dataset,
    natural_crops,
    natural_photos,
    place_digits,
)
from dinobench.data.subsets import stratified_indices
from dinobench.errors import DataError
from helpers import REAL_DATA

real_data = pytest.mark.real_data


def square_tile(n: int = 1) -> torch.Tensor:
    return torch.full((n, 28, 28), 255, dtype=torch.uint8)


def test_a_full_tile_becomes_an_exact_square():
    # Tile side 0.5 * 32 = 16 px. At (0, 0) it covers pixels [0, 16); at (1, 1) the
    # last 16; at (0.5, 0.25) the top-left corner sits at (8, 4) px.
    where = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]])
    alpha = place_digits(square_tile(3), 32, where, fraction=0.5)[:, 0]
    expect = torch.zeros(3, 32, 32, dtype=torch.bool)
    expect[0, :16, :16] = expect[1, 16:, 16:] = expect[2, 4:20, 8:24] = True
    assert torch.equal(alpha > 0.5, expect)
    assert torch.equal(alpha[expect], torch.ones(int(expect.sum())))


def test_blend_on_a_background_and_on_black():
    # A dark green background (luma 0.29): white ink.
    bg = torch.tensor([10, 100, 60], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    digits = torch.zeros(4, 28, 28, dtype=torch.uint8)
    digits[:, 6:22, 10:18] = 255
    digits[:, 8:12, 4:8] = 100  # faint ink: blended, below the mask threshold
    images, masks = composite(digits, "cifar10", 32, seed=0, background_images=bg.contiguous())
    where = torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    alpha = place_digits(digits, 32, where)  # the same draws as the seed gives
    expect = ((alpha + (1 - alpha) * bg[:1].float() / 255) * 255).round().to(torch.uint8)
    assert torch.equal(images, expect)
    assert torch.equal(masks, alpha[:, 0] > 0.5)
    assert masks.any() and (~masks).any()
    off = alpha[:, 0] == 0  # no ink: exactly the background colour
    assert torch.equal(images.permute(0, 2, 3, 1)[off],
                       torch.tensor([10, 100, 60], dtype=torch.uint8).expand(int(off.sum()), 3))
    black, black_masks = composite(digits, "none", 32, seed=0)
    assert torch.equal(black_masks, masks)  # the background does not move the digit
    assert torch.equal(black[:, 0], black[:, 2])  # white ink on black stays grey
    assert torch.equal(black_masks, black[:, 0] >= 128)


def test_bright_backgrounds_get_black_ink():
    pale = torch.tensor([230, 240, 250], dtype=torch.uint8).view(1, 3, 1, 1)
    bgs = torch.cat([pale, torch.zeros_like(pale)]).expand(2, 3, 16, 16).contiguous()
    images, _ = composite(square_tile(40), "cifar10", 32, seed=1, background_images=bgs,
                          fraction=0.5)
    which = torch.randint(2, (40,), generator=torch.Generator().manual_seed(2))
    assert 0 < int(which.sum()) < 40  # both backgrounds drawn
    where = torch.rand(40, 2, generator=torch.Generator().manual_seed(1))
    full = place_digits(square_tile(40), 32, where, fraction=0.5)[:, 0] == 1  # pure ink
    for img, f, w in zip(images, full, which.tolist()):
        assert f.sum() >= 196 and (img[:, f] == (0 if w == 0 else 255)).all()


def test_same_seed_same_relative_layout_at_every_size():
    tile = square_tile(5)
    boxes = []
    for size in (32, 64, 96):
        _, m = composite(tile, "none", size, seed=4)
        rows, cols = m.any(2).float(), m.any(1).float()
        top = rows.argmax(1) / size
        left = cols.argmax(1) / size
        boxes.append(torch.stack([top, left, rows.sum(1) / size], 1))
    for other in boxes[1:]:  # same fractions up to a pixel of the smallest canvas
        assert torch.allclose(other, boxes[0], atol=1.01 / 32)
    a, _ = composite(tile, "none", 32, seed=4)
    b, _ = composite(tile, "none", 32, seed=5)
    assert torch.equal(a, composite(tile, "none", 32, seed=4)[0]) and not torch.equal(a, b)


def test_natural_crops_match_slicing():
    photos = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    which = torch.tensor([0, 1, 1])
    corner = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.3]])
    crops = natural_crops(photos, which, corner, crop=20)
    for c, w, (fx, fy) in zip(crops, which.tolist(), corner.tolist()):
        left, top = int(fx * 30), int(fy * 20)
        assert torch.equal(c, photos[w, :, top:top + 20, left:left + 20])
    with pytest.raises(ValueError, match="exceeds"):
        natural_crops(photos, which, corner, crop=41)


def test_natural_backgrounds_come_from_the_bundled_photos():
    photos = natural_photos()
    assert photos.shape == (2, 3, 427, 640) and photos.dtype == torch.uint8
    images, masks = composite(square_tile(3), "natural", 32, seed=0, fraction=0.5)
    assert images.shape == (3, 3, 32, 32) and masks.sum((1, 2)).tolist() == [256] * 3
    assert images.float().std() > 10  # a textured background, not a flat one


def test_unknown_or_missing_backgrounds_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="unknown background"):
        composite(square_tile(), "sky", 32)
    with pytest.raises(DataError, match="needs uint8"):
        composite(square_tile(), "cifar10", 32)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (20, 28, 28), np.uint8),
             y_train=rng.integers(0, 10, 20), x_test=rng.integers(0, 256, (8, 28, 28),
                                                                  np.uint8),
             y_test=rng.integers(0, 10, 8))
    ds = composite_dataset("none", 64, data_dir=tmp_path, n_train=12)
    assert ds.name == "mnist-none-64" and ds.spec.grid == 8 and ds.spec.channels == 3
    assert ds.train_images.shape == (12, 3, 64, 64) and ds.test_masks.shape == (8, 64, 64)
    assert ds.train_labels.dtype == torch.int64
    with pytest.raises(DataError, match="cifar10.npz"):
        composite_dataset("cifar10", 32, data_dir=tmp_path)
    with pytest.raises(DataError, match="mnist.npz"):
        composite_dataset("none", 32, data_dir=tmp_path / "nowhere")


@real_data
def test_real_mnist_composites():
    if not (REAL_DATA / "mnist.npz").is_file():
        pytest.skip(f"real MNIST absent: {REAL_DATA / 'mnist.npz'}")
    y_all = np.load(REAL_DATA / "mnist.npz")["y_test"]
    for size in (32, 96):
        ds = composite_dataset("natural", size, data_dir=REAL_DATA, n_train=40, n_test=30)
        assert ds.test_images.shape == (30, 3, size, size)
        # Digits keep their labels: the test composites are the rows of a stratified
        # subset drawn with the test split's seed, each labelled with its own digit.
        rows = stratified_indices(y_all, 30, np.random.default_rng(10_000))
        assert ds.test_labels.tolist() == y_all[rows].tolist()
        counts = np.bincount(ds.test_labels.numpy(), minlength=10)
        share = 30 * np.bincount(y_all, minlength=10) / len(y_all)
        assert np.all(np.abs(counts - share) < 1)  # each class keeps its share
        frac = ds.test_masks.float().mean().item()
        assert 0.03 < frac < 0.25  # a digit, not the whole canvas nor nothing
