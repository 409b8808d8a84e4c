"""MNIST digits composited onto backgrounds of rising clutter, with exact masks.

The seed asks whether background clutter hurts DINO's object finding and whether
resolution matters. Real photos confound the two and have no exact masks, so here an
MNIST digit is alpha-blended (its ink intensity is the alpha) onto:

``none``     black: the digit alone;
``cifar10``  CIFAR-10 images upsampled to the canvas (train composites use the train
             split, test composites the test split);
``natural``  random square crops of scikit-learn's two bundled photos (china.jpg and
             flower.jpg; no download), resized to the canvas.

at 32, 64 and 96 px with the same 8x8 patch grid. The digit's side is a fixed fraction of
the canvas and its position a fixed fraction of the free room, drawn once per image from
the seed, so between sizes only the resolution changes and between backgrounds only the
background. The ink is white, or black where the background under the digit is bright
(a white digit on a pale sky would be invisible, not cluttered). The pixel mask is exact
by construction: the pixels whose alpha exceeds 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .registry import Dataset, DatasetSpec
from .subsets import stratified_indices

BACKGROUNDS = ("none", "cifar10", "natural")
SIZES = (32, 64, 96)
GRID = 8  # patches per side at every size: patch 4, 8 or 12 px
# Side of the 28x28 MNIST tile as a fraction of the canvas. The ink fills the central
# 20x20 of a tile, so the digit spans about 0.64 of the canvas: large enough that its
# strokes cover half of a few patches even at 32 px, small enough to leave background.
DIGIT_FRACTION = 0.9
NATURAL_CROP = 160  # side of a natural-photo crop in source pixels (photos are 427x640)
_CHUNK = 1024  # images per tensor call: bounds memory at 96 px
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as the augmentation's greyscale


@dataclass
class MaskedDataset(Dataset):
    """A :class:`Dataset` whose test (and train) images come with exact pixel masks
    ``bool (N, H, W)`` of the object."""

    train_masks: torch.Tensor | None = None
    test_masks: torch.Tensor | None = None


def place_digits(digits: torch.Tensor, size: int, where: torch.Tensor,
                 fraction: float = DIGIT_FRACTION) -> torch.Tensor:
    """Alpha maps ``float (N, 1, size, size)`` in [0, 1] with each ``uint8`` digit tile
    ``(N, h, w)`` scaled to ``fraction * size`` pixels and its top-left corner at
    ``where (N, 2)`` (x, y as fractions of the free room), by one bilinear resampling."""
    if digits.ndim == 4:
        digits = digits[:, 0]
    side = fraction * size
    if not 0 < fraction <= 1:
        raise ValueError(f"digit fraction must lie in (0, 1], got {fraction}")
    n = digits.shape[0]
    lo = where.to(torch.float32) * (size - side)  # (N, 2) top-left corner in pixels
    centre = 2 * (lo + side / 2) / size - 1  # in grid_sample's [-1, 1] units
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = size / side  # canvas -> tile coordinates
    theta[:, :, 2] = -centre * size / side
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    tiles = digits[:, None].float() / 255.0
    return F.grid_sample(tiles, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).clamp(0, 1)


def resize_backgrounds(images: torch.Tensor, size: int) -> torch.Tensor:
    """``uint8 (N, 3, h, w)`` -> ``float (N, 3, size, size)`` in [0, 1], bilinear
    (antialiased when shrinking)."""
    x = images.float() / 255.0
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1]).clamp(0, 1)


def natural_photos() -> torch.Tensor:
    """scikit-learn's bundled photos as ``uint8 (2, 3, 427, 640)``."""
    from sklearn.datasets import load_sample_images

    return torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2)


def natural_crops(photos: torch.Tensor, which: torch.Tensor, corner: torch.Tensor,
                  crop: int = NATURAL_CROP) -> torch.Tensor:
    """Square ``crop``-pixel crops ``uint8 (N, 3, crop, crop)`` of ``photos[which]`` with
    top-left corners at ``corner (N, 2)`` (fractions of the free room), gathered with one
    indexing call (no copy of a whole photo per crop)."""
    _, _, h, w = photos.shape
    if crop > min(h, w):
        raise ValueError(f"crop {crop} exceeds the photos' {h}x{w}")
    left = (corner[:, 0] * (w - crop)).long()
    top = (corner[:, 1] * (h - crop)).long()
    offs = torch.arange(crop)
    rows = (top[:, None] + offs)[:, :, None]  # (N, crop, 1)
    cols = (left[:, None] + offs)[:, None, :]  # (N, 1, crop)
    # (N, crop, crop, 3) -> (N, 3, crop, crop)
    return photos.permute(0, 2, 3, 1)[which[:, None, None], rows, cols].permute(0, 3, 1, 2)


def composite(digits: torch.Tensor, background: str, size: int, *, seed: int = 0,
              background_images: torch.Tensor | None = None,
              fraction: float = DIGIT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite images ``uint8 (N, 3, size, size)`` and masks ``bool (N, size, size)``.

    ``background_images``: ``uint8 (M, 3, h, w)`` drawn from at random for ``cifar10``
    (CIFAR-10 images) and ``natural`` (default: scikit-learn's photos). Digit positions
    come from ``seed`` alone and background draws from ``seed + 1``, so the same seed
    puts the same digit at the same relative place for every size and background.
    """
    if background not in BACKGROUNDS:
        raise DataError(f"unknown background {background!r}; choose one of: "
                        f"{', '.join(BACKGROUNDS)}")
    n = digits.shape[0]
    where = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))
    bg_gen = torch.Generator().manual_seed(seed + 1)
    if background == "natural" and background_images is None:
        background_images = natural_photos()
    if background != "none":
        if background_images is None or background_images.ndim != 4 or (
                background_images.shape[1] != 3):
            raise DataError(f"background {background!r} needs uint8 (M, 3, h, w) images")
        which = torch.randint(background_images.shape[0], (n,), generator=bg_gen)
        corner = torch.rand(n, 2, generator=bg_gen)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    masks = torch.empty(n, size, size, dtype=torch.bool)
    for i in range(0, n, _CHUNK):
        s = slice(i, i + _CHUNK)
        alpha = place_digits(digits[s], size, where[s], fraction)  # (n, 1, S, S)
        if background == "none":
            bg = torch.zeros(1, 3, size, size)
        elif background == "cifar10":
            bg = resize_backgrounds(background_images[which[s]], size)
        else:
            bg = resize_backgrounds(natural_crops(background_images, which[s], corner[s]),
                                    size)
        x = alpha * ink_colour(alpha, bg) + (1 - alpha) * bg
        images[s] = (x * 255).round().to(torch.uint8)
        masks[s] = alpha[:, 0] > 0.5
    return images, masks


def ink_colour(alpha: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """White ink, or black where the background under the digit is bright (its
    alpha-weighted luma above one half), so that a digit never vanishes into a pale sky:
    ``(N, 1, 1, 1)`` in {0, 1}."""
    luma = (background * _LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)  # (N | 1, 1, S, S)
    under = (luma * alpha).sum((2, 3), keepdim=True) / alpha.sum((2, 3), keepdim=True
                                                                ).clamp(min=1e-6)
    return (under <= 0.5).float()


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of a Keras-layout ``.npz`` file, with a clear error when absent.
    Cached: the benchmark builds several sizes from the same files."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; composites read Keras-layout npz files "
                        "(x_train, y_train, x_test, y_test): pass the folder holding "
                        "them with --data-dir")
    return _read_npz(str(path.resolve()), path.stat().st_mtime_ns, keys)


@lru_cache(maxsize=2)
def _read_npz(path: str, mtime_ns: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        missing = [k for k in keys if k not in f.files]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}; expected the Keras layout")
        return {k: f[k] for k in keys}  # shared by the cache's callers: read only


def _subset(labels: np.ndarray, n: int | None, seed: int, split: str) -> torch.Tensor:
    """All rows, or a stratified seeded subset of ``n`` (an error when ``n`` is out of
    range, as for every other dataset)."""
    if n is None:
        return torch.arange(len(labels))
    rows = stratified_indices(labels, n, np.random.default_rng(seed),
                              flag=f"--{split}-subset", what=f"MNIST {split} images")
    return torch.from_numpy(rows)


def composite_dataset(background: str, size: int, *, data_dir: str | Path | None = None,
                      n_train: int | None = None, n_test: int | None = None, seed: int = 0,
                      fraction: float = DIGIT_FRACTION) -> MaskedDataset:
    """MNIST (``data_dir/mnist.npz``; default folder as :func:`load_dataset`) composited
    onto ``background`` at ``size`` px.

    Named ``mnist-<background>-<size>``; train and test keep MNIST's splits (random
    subsets of ``n_train`` / ``n_test`` when given). ``cifar10`` backgrounds read
    ``data_dir/cifar10.npz`` and raise :class:`DataError` when it is absent, so a caller
    can skip that background with the message.
    """
    if size % GRID:
        raise DataError(f"composite size {size} is not a multiple of the {GRID}x{GRID} grid")
    if data_dir is None:  # the same default folder as load_dataset
        from .sources import resolve_data_dir

        data_dir = resolve_data_dir(None)
    data_dir = Path(data_dir)
    mnist = read_npz(data_dir / "mnist.npz", ("x_train", "y_train", "x_test", "y_test"))
    bg = {"train": None, "test": None}
    if background == "cifar10":
        cifar = read_npz(data_dir / "cifar10.npz", ("x_train", "x_test"))
        for split in bg:  # (N, 32, 32, 3) -> (N, 3, 32, 32)
            bg[split] = torch.from_numpy(cifar[f"x_{split}"]).permute(0, 3, 1, 2)
    parts = {}
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 10_000)):
        x, y = mnist[f"x_{split}"], mnist[f"y_{split}"]
        idx = _subset(y, n, seed + offset, split)
        # Separate seeds per split so test positions and backgrounds are fresh draws.
        parts[split] = composite(torch.from_numpy(x)[idx], background, size,
                                 seed=seed + offset, background_images=bg[split],
                                 fraction=fraction) + (torch.from_numpy(y)[idx].long(),)
    train = parts["train"][0].float() / 255.0
    spec = DatasetSpec(
        name=f"mnist-{background}-{size}", image_size=size, grid=GRID, channels=3,
        mean=tuple(round(v, 4) for v in train.mean((0, 2, 3)).tolist()),
        std=tuple(round(max(v, 1e-3), 4) for v in train.std((0, 2, 3)).tolist()),
        classes=tuple(str(i) for i in range(10)), epochs=200, natural_images=False,
        description=f"MNIST digits on {background} backgrounds at {size} px, exact masks")
    return MaskedDataset(spec, parts["train"][0], parts["train"][2], parts["test"][0],
                         parts["test"][2], source=str(data_dir / "mnist.npz"),
                         train_masks=parts["train"][1], test_masks=parts["test"][1])
