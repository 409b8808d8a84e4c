"""Linear probe: logistic regression on frozen, standardised features (DINO, Sec. 4.1).

The inverse regularisation strength C is chosen on a stratified held-out part of the
train split, never on the test split; the probe is then refit on the whole train split
with that C and scored once on the test split.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..errors import ConfigError

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
_SMALL = 2**20  # feature-matrix entries below which a fit runs on one BLAS thread


@dataclass
class ProbeResult:
    top1: float  # test top-1 (%) of the probe refit on the whole train split
    train_top1: float  # top-1 (%) of that probe on the train split (learning curves)
    C: float  # the chosen inverse regularisation strength
    val_top1: dict[float, float] = field(default_factory=dict)  # held-out top-1 per C
    converged: bool = True  # False when lbfgs stopped at max_iter in any fit


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int):
    """Fit scaler + logistic regression; returns the model and whether lbfgs converged."""
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    # On small problems BLAS thread start-up and spinning cost more than the arithmetic
    # (several times the fit on a busy machine); large ones keep every thread.
    limit = 1 if x.size < _SMALL else None
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=limit):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _top1(model, x: np.ndarray, y: np.ndarray) -> float:
    return 100.0 * float((model.predict(x) == y).mean()) if len(y) else math.nan


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 Cs: tuple[float, ...] = DEFAULT_CS, val_fraction: float = 0.2,
                 seed: int = 0, max_iter: int = 300) -> ProbeResult:
    """Top-1 (%) of a logistic-regression probe on frozen features.

    ``Cs``: the grid searched on a stratified ``val_fraction`` of the train split; the
    best held-out top-1 wins, ties going to the smaller C (the stronger regularisation).
    With one C there is nothing to select and no split is made. Standardisation is fit
    on the images each probe is trained on, so held-out statistics never leak in.
    """
    x, y = _numpy(train_features), _numpy(train_labels)
    xt, yt = _numpy(test_features), _numpy(test_labels)
    if x.ndim != 2 or xt.ndim != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y):
        raise ValueError(f"need train features (N, D) with N labels and test features "
                         f"(M, D); got {x.shape}, {y.shape}, {xt.shape}")
    if not Cs or any(c <= 0 for c in Cs):
        raise ConfigError(f"the C grid needs positive values, got {Cs}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ConfigError("a linear probe needs labelled images of at least two classes")
    Cs = tuple(sorted(float(c) for c in Cs))
    converged = True
    val_top1: dict[float, float] = {}
    if len(Cs) > 1:
        n_val = max(round(val_fraction * len(y)), len(classes))
        if counts.min() < 2 or len(y) - n_val < len(classes):
            raise ConfigError(
                f"cannot hold out a stratified part of {len(y)} labelled images "
                f"({counts.min()} in the rarest class) to choose C; use at least 2 "
                "labelled images per class (--labels-per-class) or give a single C")
        fit_idx, val_idx = train_test_split(np.arange(len(y)), test_size=n_val,
                                            stratify=y, random_state=seed)
        for c in Cs:
            model, ok = _fit(x[fit_idx], y[fit_idx], c, max_iter, seed)
            converged &= ok
            val_top1[c] = _top1(model, x[val_idx], y[val_idx])
    best = max(Cs, key=lambda c: (val_top1.get(c, 0.0), -c))  # ties: smaller C
    model, ok = _fit(x, y, best, max_iter, seed)
    return ProbeResult(top1=_top1(model, xt, yt), train_top1=_top1(model, x, y), C=best,
                       val_top1=val_top1, converged=converged and ok)
