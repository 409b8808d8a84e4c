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
