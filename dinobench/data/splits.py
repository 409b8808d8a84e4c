"""Checked arrays from a source, turned into the :class:`Dataset` a run trains on.

Every source (Keras ``.npz``, torchvision's on-disk layouts, scikit-learn) yields a
:class:`RawSplits`: numpy arrays with images as ``uint8 (N, C, H, W)`` at the files'
image size. They may be lazy views (a memory map, a transposed view); nothing is copied
until :func:`build_dataset` picks the rows a run uses and writes them, zero-padded to
the spec's image size where the files are smaller, into contiguous torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError
from .registry import Dataset, DatasetSpec
from .subsets import per_class_indices, random_indices, stratified_indices

_COPY_CHUNK = 4096  # images per copy step: bounds the temporary memory of a gather


@dataclass
class RawSplits:
    """One dataset's splits as read from a source, images ``(N, C, H, W)`` uint8."""

    x_train: np.ndarray
    y_train: np.ndarray  # int64 (N,), 0..C-1
    x_test: np.ndarray
    y_test: np.ndarray
    x_unlabeled: np.ndarray | None = None  # images without labels, for pre-training only
    origin: str = ""  # the file or folder they came from


def check_images(x: np.ndarray, spec: DatasetSpec, where: str, *,
                 channels_last: bool = True) -> np.ndarray:
    """Validate an image array and return it as an ``(N, C, H, W)`` view.

    ``channels_last``: ``x`` is ``(N, H, W)`` or ``(N, H, W, C)`` (the Keras layout);
    otherwise it is already ``(N, C, H, W)``. ``where`` names the file and array in
    error messages.
    """
    if x.dtype != np.uint8:
        raise DataError(f"{where} has dtype {x.dtype}, expected uint8 pixel values 0..255; "
                        "save the images as uint8")
    if channels_last and x.ndim == 3:
        x = x[:, None]
    elif channels_last and x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        expected = "(N, H, W) or (N, H, W, C)" if channels_last else "(N, C, H, W)"
        raise DataError(f"{where} has shape {x.shape}, expected {expected} images")
    n, c, h, w = x.shape
    if n == 0:
        raise DataError(f"{where} holds no images; write a file with at least one image "
                        "per split")
    if c != spec.channels:
        raise DataError(f"{where} has {c} channel(s), but {spec.name} images have "
                        f"{spec.channels}; check that the file holds {spec.name}")
    sides = sorted({spec.stored_image_size, spec.image_size})
    if h != w or h not in sides:
        allowed = " or ".join(f"{s}x{s}" for s in sides)
        raise DataError(f"{where} holds {h}x{w} images, but {spec.name} images are "
                        f"{allowed}; check that the file holds {spec.name}")
    return x


def check_labels(y: np.ndarray, n_images: int, spec: DatasetSpec, where: str) -> np.ndarray:
    """Validate labels for ``n_images`` images; return them as ``int64 (N,)``."""
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where} has dtype {y.dtype}, expected integer class indices "
                        f"0..{spec.num_classes - 1}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # Keras keeps CIFAR labels as (N, 1)
    if y.ndim != 1:
        raise DataError(f"{where} has shape {y.shape}, expected (N,) labels")
    if len(y) != n_images:
        raise DataError(f"{where} holds {len(y):,} labels for {n_images:,} images; images "
                        "and labels must have the same length")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= spec.num_classes:
        raise DataError(f"{where} holds labels {lo}..{hi}, but {spec.name} has "
                        f"{spec.num_classes} classes, so labels must lie in "
                        f"0..{spec.num_classes - 1}")
    return y.astype(np.int64)


def to_tensor(x: np.ndarray, spec: DatasetSpec, rows: np.ndarray | None = None
              ) -> torch.Tensor:
    """Rows of an ``(N, C, h, w)`` array as a contiguous ``uint8`` tensor at the spec's
    image size. A smaller image is centred on a zero canvas (MNIST 28 -> 32), never
    interpolated. Copies in chunks, so a memory-mapped source is read once, row by row.
    """
    n = x.shape[0] if rows is None else len(rows)
    c, h, w = x.shape[1:]
    size = spec.image_size
    pad_h, pad_w = (size - h) // 2, (size - w) // 2
    out = (torch.zeros if (h, w) != (size, size) else torch.empty)(
        (n, c, size, size), dtype=torch.uint8)
    canvas = out.numpy()[:, :, pad_h:pad_h + h, pad_w:pad_w + w]  # view into `out`
    for start in range(0, n, _COPY_CHUNK):
        stop = min(start + _COPY_CHUNK, n)
        canvas[start:stop] = x[start:stop] if rows is None else x[rows[start:stop]]
    return out


def build_dataset(raw: RawSplits, spec: DatasetSpec, *, train_subset: int | None = None,
                  labels_per_class: int | None = None, pretrain_subset: int | None = None,
                  test_subset: int | None = None, seed: int = 0, source: str | None = None
                  ) -> Dataset:
    """Select the rows a run uses and copy them into tensors.

    ``train_subset`` draws a stratified subset of the train split; it is then both the
    labelled train split and (without an unlabelled split) the pre-training set.
    ``labels_per_class`` keeps exactly that many labelled images per class from it, for
    k-NN banks, probes and baselines, while pre-training still sees every train image.
    ``pretrain_subset`` draws a uniform subset of the pre-training images (the unlabelled
    split where there is one). ``test_subset`` draws a stratified subset of the test
    split (for quick evaluations). Each draw has its own random stream from ``seed``.
    """
    rngs = [np.random.default_rng([seed, k]) for k in range(4)]
    train_rows = np.arange(len(raw.y_train))
    if train_subset is not None:
        train_rows = stratified_indices(raw.y_train, train_subset, rngs[0])
    labelled_rows = train_rows
    if labels_per_class is not None:
        labelled_rows = train_rows[per_class_indices(
            raw.y_train[train_rows], labels_per_class, spec.num_classes, rngs[1])]

    train_images = to_tensor(raw.x_train, spec, labelled_rows)
    if raw.x_unlabeled is not None:
        pretrain_x, pretrain_rows = raw.x_unlabeled, None
        available, what = len(raw.x_unlabeled), "unlabelled images"
    else:
        pretrain_x, pretrain_rows = raw.x_train, train_rows
        available, what = len(train_rows), "train images used for pre-training"
    if pretrain_subset is not None:
        picked = random_indices(available, pretrain_subset, rngs[2], what=what)
        pretrain_rows = picked if pretrain_rows is None else pretrain_rows[picked]
    if pretrain_x is raw.x_train and np.array_equal(pretrain_rows, labelled_rows):
        pretrain_images = train_images  # the same images: share the memory
    else:
        pretrain_images = to_tensor(pretrain_x, spec, pretrain_rows)

    test_rows = np.arange(len(raw.y_test))
    if test_subset is not None:
        test_rows = stratified_indices(raw.y_test, test_subset, rngs[3], flag="--test-subset",
                                       what="test images")
    return Dataset(spec, train_images, torch.from_numpy(raw.y_train[labelled_rows]),
                   to_tensor(raw.x_test, spec, test_rows),
                   torch.from_numpy(raw.y_test[test_rows].copy()),
                   pretrain_images, source=source or raw.origin)
