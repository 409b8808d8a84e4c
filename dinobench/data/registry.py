"""Dataset registry: what each dataset is, and the loaded tensors a run works on.

A :class:`DatasetSpec` holds the per-dataset defaults taken from the seed (image side,
patch grid, epochs) plus the channel statistics used to normalise model inputs and the
official class names. A :class:`Dataset` is what :func:`dinobench.data.load_dataset`
returns: ``uint8`` image tensors at ``spec.image_size`` and ``int64`` labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    image_size: int  # side the images are stored and trained at (global crop side)
    grid: int  # patches per side (the seed's choice for this dataset)
    channels: int
    mean: tuple[float, ...]  # per-channel mean in [0, 1] units (for normalisation)
    std: tuple[float, ...]
    classes: tuple[str, ...]
    epochs: int  # the seed's epoch count for this dataset
    description: str = ""
    # Image side in the files (None: image_size); smaller images are zero-padded to
    # image_size, never interpolated (MNIST: 28 -> 32).
    file_image_size: int | None = None
    # Photographs (True) or digits (False). Recipes whose flip and solarisation are
    # "auto" (None) use both on photographs only: a mirrored digit is another shape (or
    # none), and solarising white ink on black turns the ink black, erasing the digit.
    natural_images: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def stored_image_size(self) -> int:
        """Side of the images as they come out of the files."""
        return self.file_image_size or self.image_size


@dataclass
class Dataset:
    """Images as ``uint8 (N, C, H, W)`` at ``spec.image_size``; labels ``int64 (N,)``.

    ``pretrain_images`` is what DINO trains on without labels: an unlabelled split where
    the dataset has one (STL-10), else the train images (their labels unused). The train
    split serves k-NN banks, probes and supervised baselines; the test split evaluates.
    """

    spec: DatasetSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    pretrain_images: torch.Tensor | None = None
    source: str = ""  # where the data came from (file, folder or package)

    def __post_init__(self):
        if self.pretrain_images is None:
            self.pretrain_images = self.train_images

    @property
    def name(self) -> str:
        return self.spec.name


SPECS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    SPECS[spec.name] = spec
    return spec


# Channel statistics. MNIST and CIFAR-10: computed over the full official train split
# (60,000 and 50,000 images) read from the real copies in ../shared/data, in [0, 1] units.
# MNIST is measured after zero-padding 28x28 to 32x32, so its mean is 784/1024 of the
# familiar 28x28 value 0.1307. CIFAR-10 matches the published (0.4914, 0.4822, 0.4465) /
# (0.2470, 0.2435, 0.2616). STL-10 has no local copy: the commonly published values over
# its images are used.
MNIST = register(DatasetSpec(
    name="mnist", image_size=32, grid=4, channels=1,
    mean=(0.1000,), std=(0.2752,),
    classes=tuple(str(i) for i in range(10)), epochs=200, natural_images=False,
    description="MNIST handwritten digits: 60,000 train + 10,000 test, 28x28 grey, "
                "zero-padded to 32x32",
    file_image_size=28,
))

CIFAR10 = register(DatasetSpec(
    name="cifar10", image_size=32, grid=8, channels=3,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
             "ship", "truck"),
    epochs=1000,
    description="CIFAR-10: 50,000 train + 10,000 test, 32x32 colour, 10 classes",
))

STL10 = register(DatasetSpec(
    name="stl10", image_size=96, grid=8, channels=3,
    mean=(0.4467, 0.4398, 0.4066), std=(0.2603, 0.2566, 0.2713),
    classes=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
             "truck"),
    epochs=1000,
    description="STL-10: 100,000 unlabelled + 5,000 train + 8,000 test, 96x96 colour",
))
