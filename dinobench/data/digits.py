"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download.

The embedded default dataset: scaled to 32x32 (a 4x4 grid of 8-px patches, like MNIST in
the seed) so the same ViT and crops apply. A fixed stratified split keeps 25% for test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Dataset, DatasetSpec, register
from .splits import RawSplits, build_dataset

DIGITS = register(DatasetSpec(
    name="digits", image_size=32, grid=4, channels=1,
    mean=(0.305,), std=(0.324,),  # of the 32x32 train split
    classes=tuple(str(i) for i in range(10)), epochs=6, natural_images=False,
    description="scikit-learn digits: 1,797 real 8x8 images scaled to 32x32 (embedded)",
))


def read_digits(test_fraction: float = 0.25) -> RawSplits:
    """The digits scaled to 32x32 (bilinear: 8 px is too coarse to pad), split 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(DIGITS.image_size,) * 2, mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=bunch.target, random_state=0)
    return RawSplits(images[idx_train], labels[idx_train], images[idx_test],
                     labels[idx_test], origin="sklearn.datasets.load_digits")


def load_digits_dataset(test_fraction: float = 0.25) -> Dataset:
    return build_dataset(read_digits(test_fraction), DIGITS)
