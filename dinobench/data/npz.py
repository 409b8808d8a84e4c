"""The Keras ``.npz`` layout: ``<data-dir>/<name>.npz``.

Keys ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``x_unlabeled``
(images for pre-training only). Images are ``uint8`` ``(N, H, W)`` or ``(N, H, W, C)``;
labels are integers ``(N,)`` or ``(N, 1)`` in ``0..C-1``. Other keys are ignored. This is
what ``keras.datasets.<name>.load_data()`` returns, saved with ``np.savez``.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .registry import DatasetSpec
from .splits import RawSplits, check_images, check_labels

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_unlabeled",)
KEYS = "Keras layout: x_train, y_train, x_test, y_test"  # short form for messages
LAYOUT = ("x_train, y_train, x_test, y_test (uint8 images HxW or HxWxC, integer labels), "
          "optionally x_unlabeled")

# What numpy raises on a damaged archive or member: a bad zip directory, a short read,
# a broken deflate stream, a header it cannot parse.
_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def read_npz(path: Path, spec: DatasetSpec) -> RawSplits:
    """Read and validate ``path``; every problem is a :class:`DataError` naming it."""
    fix = f"replace it with a complete copy holding {LAYOUT}"
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise DataError(f"{path} is corrupt, truncated or not an .npz archive "
                        f"({one_line(e)}); {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive; {fix}")
    with archive:
        missing = [k for k in REQUIRED_KEYS if k not in archive.files]
        if missing:
            raise DataError(f"{path} lacks key(s) {', '.join(missing)}; a dataset .npz holds "
                            f"{LAYOUT}")
        arrays = {}
        for key in REQUIRED_KEYS + OPTIONAL_KEYS:
            if key not in archive.files:
                continue
            try:
                arrays[key] = archive[key]
            except _READ_ERRORS as e:
                raise DataError(f"{path} is corrupt or truncated: array {key!r} cannot be "
                                f"read ({one_line(e)}); {fix}") from None

    x_train = check_images(arrays["x_train"], spec, f"{path}: x_train")
    x_test = check_images(arrays["x_test"], spec, f"{path}: x_test")
    unlabeled = arrays.get("x_unlabeled")
    if unlabeled is not None:
        unlabeled = check_images(unlabeled, spec, f"{path}: x_unlabeled")
    return RawSplits(
        x_train, check_labels(arrays["y_train"], len(x_train), spec, f"{path}: y_train"),
        x_test, check_labels(arrays["y_test"], len(x_test), spec, f"{path}: y_test"),
        unlabeled, origin=str(path))


def one_line(e: Exception) -> str:
    """An exception as one short line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
