"""Datasets as uint8 tensors: the registry and the loaders."""

from __future__ import annotations

from ..errors import DataError
from .digits import load_digits_dataset
from .registry import SPECS, Dataset, DatasetSpec


def known_datasets() -> list[str]:
    return sorted(SPECS)


def load_dataset(name: str, *, data_dir=None, download: bool = False,
                 train_subset: int | None = None, labels_per_class: int | None = None,
                 pretrain_subset: int | None = None, seed: int = 0) -> Dataset:
    """Load a registered dataset by name."""
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; known datasets: "
                        f"{', '.join(known_datasets())}")
    if name == "digits":
        return load_digits_dataset()
    raise DataError(f"dataset {name!r} has no loader")  # pragma: no cover


__all__ = ["Dataset", "DatasetSpec", "SPECS", "known_datasets", "load_dataset"]
