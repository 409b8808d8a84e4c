"""Seeded subsets of a split, so that a run fits a CPU or a short GPU job.

Pure functions from labels (or a count) and a numpy ``Generator`` to sorted row indices;
the same seed gives the same rows on every machine. A request larger than what is there
is an error naming both sizes, never a silent clamp.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError


def _check_size(n: int, available: int, flag: str, what: str) -> None:
    if n < 1:
        raise DataError(f"{flag} must be at least 1, got {n}")
    if n > available:
        raise DataError(f"{flag} {n:,} exceeds the {available:,} {what}; choose at most "
                        f"{available:,}")


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator, *,
                       flag: str = "--train-subset", what: str = "train images"
                       ) -> np.ndarray:
    """``n`` rows drawn so each class keeps its share of ``labels``.

    Class quotas are ``n * count / total`` rounded down; the rows left over go to the
    classes with the largest remainders (ties broken at random), so the sizes add up to
    ``n`` exactly and no class gets more than it has.
    """
    _check_size(n, len(labels), flag, what)
    classes, counts = np.unique(labels, return_counts=True)
    take, remainder = np.divmod(n * counts, len(labels))
    short = n - int(take.sum())
    if short:
        order = np.lexsort((rng.random(len(classes)), -remainder))  # largest first
        take[order[:short]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def per_class_indices(labels: np.ndarray, n: int, num_classes: int,
                      rng: np.random.Generator, *, flag: str = "--labels-per-class"
                      ) -> np.ndarray:
    """Exactly ``n`` rows of every class ``0..num_classes-1``."""
    if n < 1:
        raise DataError(f"{flag} must be at least 1, got {n}")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < n:
        c = int(counts.argmin())
        raise DataError(f"{flag} {n:,} exceeds the {int(counts[c]):,} train images of class "
                        f"{c}; choose at most {int(counts[c]):,} (or a larger --train-subset)")
    picked = [rng.choice(np.flatnonzero(labels == c), n, replace=False)
              for c in range(num_classes)]
    return np.sort(np.concatenate(picked))


def random_indices(available: int, n: int, rng: np.random.Generator, *,
                   flag: str = "--pretrain-subset", what: str = "pre-training images"
                   ) -> np.ndarray:
    """``n`` of ``available`` rows, uniformly without replacement."""
    _check_size(n, available, flag, what)
    return np.sort(rng.choice(available, n, replace=False))


# The validation subset that training-time k-NN is measured on (never the test split).
# 10% of the labelled train split, capped at 5,000 images: at 5,000 the standard error of
# an accuracy is under 0.7 points, and a bigger hold-out would only slow each evaluation.
DEFAULT_VAL_FRACTION = 0.1
MAX_DEFAULT_VAL = 5000


def validation_count(n_images: int, size: int | float | None) -> int:
    """How many images ``size`` asks for: None the default (10%, at most 5,000), a float
    in (0, 1) a fraction of ``n_images``, an int a count."""
    if size is None:
        return min(round(DEFAULT_VAL_FRACTION * n_images), MAX_DEFAULT_VAL)
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"--val-size must be a count or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0 < size < 1:
            raise DataError(f"--val-size {size} as a fraction must lie in (0, 1); give a "
                            "count as a whole number (e.g. --val-size 500)")
        return round(size * n_images)
    if size < 1:
        raise DataError(f"--val-size must be at least 1, got {size}")
    return size


def validation_indices(labels: np.ndarray, size: int | float | None,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split a labelled train split into (validation rows, k-NN bank rows), both sorted.

    Stratified: each class gives its share of the ``validation_count`` images, at least
    one, and keeps at least one in the bank (the minimum of one per class can add a few
    images to a small request on unbalanced classes). A fraction or the default that
    comes out below one image per class is raised to one per class; an explicit count
    below the number of classes, or one that would empty a class of the bank, is an
    error.
    """
    classes, counts = np.unique(labels, return_counts=True)
    n_total = len(labels)
    n = validation_count(n_total, size)
    if isinstance(size, int) and not isinstance(size, bool) and n < len(classes):
        raise DataError(f"--val-size {n} is below the {len(classes)} classes; the "
                        f"validation subset needs at least one image of each")
    n = max(n, len(classes))
    if counts.min() < 2:
        c = classes[int(counts.argmin())]
        raise DataError(f"class {c} has a single labelled train image: it cannot be both "
                        "held out for validation and kept in the k-NN bank; use more "
                        "labelled images (--labels-per-class, --train-subset)")
    room = int((counts - 1).sum())
    if n > room:
        raise DataError(f"--val-size {n:,} leaves no k-NN bank image for some class; "
                        f"choose at most {room:,} of the {n_total:,} labelled train images")
    take = np.clip(n * counts // n_total, 1, counts - 1)
    # Leftover images go to the classes with the largest remainders (ties at random)
    # that still have room, so the sizes add up to n exactly.
    order = np.lexsort((rng.random(len(classes)), -(n * counts % n_total)))
    while take.sum() < n:
        for i in order:
            if take.sum() < n and take[i] < counts[i] - 1:
                take[i] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
              for c, k in zip(classes, take)]
    val = np.sort(np.concatenate(picked))
    bank = np.setdiff1d(np.arange(n_total), val, assume_unique=True)
    return val, bank
