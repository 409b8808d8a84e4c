"""The real MNIST and CIFAR-10 copies in ../shared/data, loaded as a run loads them.

Skipped, with the reason, where the files are absent. Each file is loaded once. The
expected numbers are the published ones, not values read from the package.
"""

from __future__ import annotations

import pytest
import torch

from dinobench.data import load_dataset
from helpers import REAL_DATA

pytestmark = pytest.mark.real_data


def _load(name: str):
    path = REAL_DATA / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"real {name} copy not found at {path}")
    return load_dataset(name, data_dir=REAL_DATA)


@pytest.fixture(scope="module")
def mnist():
    return _load("mnist")


@pytest.fixture(scope="module")
def cifar10():
    return _load("cifar10")


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation in [0, 1] units, exactly, from a histogram
    of the 256 pixel values (fast: no float copy of the images)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    stats = []
    for c in range(images.shape[1]):
        p = torch.bincount(images[:, c].flatten(), minlength=256).double()
        p /= p.sum()
        mean = (p * values).sum()
        stats.append((mean, ((p * (values - mean) ** 2).sum()).sqrt()))
    return torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])


def test_mnist_shapes_and_padding(mnist):
    assert mnist.train_images.shape == (60_000, 1, 32, 32)
    assert mnist.test_images.shape == (10_000, 1, 32, 32)
    assert mnist.train_images.dtype == torch.uint8 and mnist.train_labels.dtype == torch.int64
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert mnist.train_images[:, :, border].max() == 0  # zero-padded, not resized
    assert mnist.pretrain_images.shape[0] == 60_000


def test_mnist_class_balance(mnist):
    counts = torch.bincount(mnist.train_labels, minlength=10)
    # Official MNIST train: 5,421 fives to 6,742 ones.
    assert counts.min() == 5_421 and counts.max() == 6_742 and counts.sum() == 60_000
    # Official MNIST test: the published per-digit counts, 0 to 9.
    assert torch.bincount(mnist.test_labels, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_channel_statistics(mnist):
    mean, std = channel_stats(mnist.train_images)
    inner = channel_stats(mnist.train_images[:, :, 2:30, 2:30])
    assert inner[0].item() == pytest.approx(0.1307, abs=5e-4)  # the published 28x28 values
    assert inner[1].item() == pytest.approx(0.3081, abs=5e-4)
    assert mean.item() == pytest.approx(0.1307 * 784 / 1024, abs=5e-4)  # padding adds zeros
    assert mnist.spec.mean[0] == pytest.approx(mean.item(), abs=1e-3)
    assert mnist.spec.std[0] == pytest.approx(std.item(), abs=1e-3)


def test_cifar10_shapes_and_balance(cifar10):
    assert cifar10.train_images.shape == (50_000, 3, 32, 32)
    assert cifar10.test_images.shape == (10_000, 3, 32, 32)
    assert torch.equal(torch.bincount(cifar10.train_labels), torch.full((10,), 5_000))
    assert torch.equal(torch.bincount(cifar10.test_labels), torch.full((10,), 1_000))
    assert cifar10.train_images.is_contiguous()


def test_cifar10_channel_statistics(cifar10):
    mean, std = channel_stats(cifar10.train_images)
    published_mean, published_std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert mean.tolist() == pytest.approx(published_mean, abs=5e-4)
    assert std.tolist() == pytest.approx(published_std, abs=5e-4)
    assert cifar10.spec.mean == pytest.approx(mean.tolist(), abs=1e-3)
    assert cifar10.spec.std == pytest.approx(std.tolist(), abs=1e-3)

