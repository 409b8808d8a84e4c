"""Dataset registry: what each dataset is, and the loaded tensors a run works on."""

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Dataset:
    """Images as ``uint8 (N, C, H, W)`` at ``spec.image_size``; labels ``int64 (N,)``.

    ``pretrain_images`` is what DINO trains on without labels: an unlabelled split where
    the dataset has one, else the train images (their labels unused).
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
