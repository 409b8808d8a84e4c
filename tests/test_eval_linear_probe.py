"""Linear probe: known answers, C chosen on held-out train images only."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from dinobench.errors import ConfigError
from dinobench.eval.linear_probe import DEFAULT_CS, linear_probe


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n_per_class)
    x = torch.eye(classes, dim)[y] * 4 + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


def split(y: torch.Tensor, seed: int = 0):
    """The documented split: a stratified 20% of the train images held out (the probe's
    seed as its random state), the rest fitted."""
    n_val = round(0.2 * len(y))
    assert n_val >= len(torch.unique(y))
    return train_test_split(np.arange(len(y)), test_size=n_val, stratify=y.numpy(),
                            random_state=seed)


def sklearn_top1(x, y, C, fit, rows):
    """Top-1 (%) on ``rows`` of scaler + logistic regression fitted on the ``fit`` rows."""
    x, y = x.numpy(), y.numpy()
    scaler = StandardScaler().fit(x[fit])
    model = LogisticRegression(C=C, max_iter=300).fit(scaler.transform(x[fit]), y[fit])
    return 100.0 * np.mean(model.predict(scaler.transform(x[rows])) == y[rows])


def test_separable_features_give_100_percent():
    x, y = blobs(30, 5, 12, 0.2, 0)
    xt, yt = blobs(10, 5, 12, 0.2, 1)
    r = linear_probe(x, y, xt, yt, Cs=(0.1, 1.0))
    assert r.top1 == 100.0 and r.train_top1 == 100.0
    # Every C separates the held-out images perfectly: the tie goes to the smaller C.
    assert r.val_top1 == {0.1: 100.0, 1.0: 100.0} and r.C == 0.1
    # The held-out images moved onto the next class's blob, labels kept: the fitted
    # images stay separable, so a C scored on them (or on the test split) would read
    # 100%, but every held-out image is now misread.
    _, val = split(y)
    moved = x.clone()
    moved[val] += 4 * (torch.eye(5, 12)[(y[val] + 1) % 5] - torch.eye(5, 12)[y[val]])
    r = linear_probe(moved, y, xt, yt, Cs=(0.1, 1.0))
    assert r.val_top1 == {0.1: 0.0, 1.0: 0.0} and r.C == 0.1


def test_shuffled_labels_give_chance():
    gen = torch.Generator().manual_seed(2)
    x, xt = torch.randn(600, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    y = torch.randint(0, 10, (600,), generator=gen)
    yt = torch.randint(0, 10, (1000,), generator=gen)
    r = linear_probe(x, y, xt, yt, Cs=(0.01, 1.0))
    assert abs(r.top1 - 10.0) < 5 * 0.95  # binomial sd of 1,000 points at 10%


def test_test_labels_never_influence_the_choice_of_c():
    x, y = blobs(20, 4, 6, 2.5, 3)  # overlapping classes: C matters
    xt, yt = blobs(20, 4, 6, 2.5, 4)
    a = linear_probe(x, y, xt, yt)
    b = linear_probe(x, y, xt, yt[torch.randperm(len(yt), generator=torch.Generator()
                                                  .manual_seed(0))])
    assert (a.C, a.val_top1, a.train_top1) == (b.C, b.val_top1, b.train_top1)
    assert a.C == max(a.val_top1, key=lambda c: (a.val_top1[c], -c))
    # Each C's score is scikit-learn's on the held-out images of the documented split,
    # which here differs from the score on the images fitted.
    fit, val = split(y)
    want = {c: sklearn_top1(x, y, c, fit, val) for c in DEFAULT_CS}
    assert a.val_top1 == pytest.approx(want)
    assert any(sklearn_top1(x, y, c, fit, fit) != want[c] for c in DEFAULT_CS)


def test_refit_equals_an_independent_scaler_plus_logistic_regression():
    x, y = blobs(25, 3, 5, 2.0, 5)
    xt, yt = blobs(15, 3, 5, 2.0, 6)
    r = linear_probe(x, y, xt, yt, Cs=(0.3,))
    scaler = StandardScaler().fit(x.numpy())
    model = LogisticRegression(C=0.3, max_iter=300).fit(scaler.transform(x.numpy()),
                                                         y.numpy())
    expect = 100.0 * np.mean(model.predict(scaler.transform(xt.numpy())) == yt.numpy())
    assert r.top1 == pytest.approx(expect) and r.C == 0.3 and r.val_top1 == {}


def test_errors_and_convergence_flag():
    x, y = blobs(1, 3, 4, 0.1, 7)  # one image per class: nothing to hold out
    with pytest.raises(ConfigError, match="labels-per-class"):
        linear_probe(x, y, x, y)
    assert linear_probe(x, y, x, y, Cs=(1.0,)).top1 == 100.0  # one C: no split needed
    with pytest.raises(ConfigError, match="two classes"):
        linear_probe(x[:1], y[:1], x, y, Cs=(1.0,))
    with pytest.raises(ConfigError, match="positive"):
        linear_probe(x, y, x, y, Cs=(0.0,))
    with pytest.raises(ValueError, match="features"):
        linear_probe(x, y, torch.randn(2, 9), y[:2])
    xs, ys = blobs(20, 3, 6, 3.0, 8)
    assert not linear_probe(xs, ys, xs, ys, Cs=(100.0,), max_iter=1).converged
