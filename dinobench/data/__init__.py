"""Datasets as uint8 tensors: the registry and the loaders.

``load_dataset(name, ...)`` is the one entry point (the CLI and :func:`dinobench.run`
call it). MNIST, CIFAR-10 and STL-10 come from ``<data-dir>/<name>.npz`` (Keras layout)
or from torchvision's folders under the data dir (downloaded only when asked); the
scikit-learn digits are bundled. The data dir is ``--data-dir``, else ``$DINOBENCH_DATA``,
else ``~/.cache/dinobench``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .composites import BACKGROUNDS, GRID, SIZES, composite_dataset
from .digits import load_digits_dataset, read_digits
from .registry import SPECS, Dataset, DatasetSpec, register
from .sources import DATA_DIR_ENV, default_data_dir, read_files, resolve_data_dir
from .splits import build_dataset

# The background x resolution benchmark: MNIST digits on backgrounds of rising clutter,
# with exact masks, one dataset per (background, size). Their channel statistics are
# measured from the composites when they are built; these specs carry placeholders.
COMPOSITES = tuple(f"mnist-{b}-{s}" for b in BACKGROUNDS for s in SIZES)
for _name in COMPOSITES:
    _, _background, _size = _name.split("-")
    register(DatasetSpec(
        name=_name, image_size=int(_size), grid=GRID, channels=3, mean=(0.5,) * 3,
        std=(0.25,) * 3, classes=tuple(str(i) for i in range(10)), epochs=200,
        natural_images=False,
        description=f"MNIST digits on {_background} backgrounds at {_size} px, exact masks"))


def known_datasets() -> list[str]:
    return sorted(SPECS)


def load_dataset(name: str, *, data_dir: str | Path | None = None, download: bool = False,
                 train_subset: int | None = None, labels_per_class: int | None = None,
                 pretrain_subset: int | None = None, test_subset: int | None = None,
                 seed: int = 0) -> Dataset:
    """Load a registered dataset by name, as ``uint8`` tensors at its spec's image size.

    Args:
        name: one of :func:`known_datasets`.
        data_dir: folder holding ``<name>.npz`` or torchvision's dataset folders
            (default: ``$DINOBENCH_DATA``, else ``~/.cache/dinobench``).
        download: let torchvision download a dataset missing from ``data_dir``.
        train_subset: a stratified subset of this many train images; also what DINO
            pre-trains on when the dataset has no unlabelled split.
        labels_per_class: keep exactly this many labelled train images per class (for
            k-NN banks, probes and baselines); pre-training still sees all of them.
        pretrain_subset: a uniform subset of this many pre-training images (STL-10: of
            the 100,000 unlabelled; the seed used 50,000).
        test_subset: a stratified subset of this many test images (quick evaluations).
        seed: seeds the subsets. It is a data seed, separate from the training seeds, so
            every training seed of a run sees the same images.

    Raises:
        DataError: unknown name, files missing (offline), corrupt or malformed files, or
            a subset larger than the split.
    """
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; known datasets: "
                        f"{', '.join(known_datasets())}")
    spec = SPECS[name]
    if name in COMPOSITES:
        if labels_per_class is not None or pretrain_subset is not None:
            raise DataError(f"{name} takes --train-subset and --test-subset only")
        _, background, size = name.split("-")
        return composite_dataset(background, int(size), data_dir=data_dir,
                                 n_train=train_subset, n_test=test_subset, seed=seed)
    if name == "digits":
        raw = read_digits()
    else:
        raw = read_files(spec, resolve_data_dir(data_dir), download)
    return build_dataset(raw, spec, train_subset=train_subset,
                         labels_per_class=labels_per_class, pretrain_subset=pretrain_subset,
                         test_subset=test_subset, seed=seed)


__all__ = ["COMPOSITES", "DATA_DIR_ENV", "Dataset", "DatasetSpec", "SPECS", "default_data_dir",
           "known_datasets", "load_dataset", "load_digits_dataset"]
