"""Seeded subsets: stratified train subsets, exact labels per class, random pre-training
subsets, and how ``build_dataset`` combines them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinobench.data.registry import SPECS
from dinobench.data.splits import RawSplits, build_dataset
from dinobench.data.subsets import (
    per_class_indices,
    random_indices,
    stratified_indices,
    validation_indices,
)
from dinobench.errors import DataError

# Unbalanced on purpose: 50, 30, 20 images of classes 0, 1, 2 (and 7 of class 9).
LABELS = np.repeat(np.array([0, 1, 2, 9]), [50, 30, 20, 7])


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("n", [1, 10, 33, 50, 106, 107])
def test_stratified_keeps_class_shares(n):
    rows = stratified_indices(LABELS, n, rng())
    assert len(rows) == n and len(np.unique(rows)) == n and np.all(np.diff(rows) > 0)
    counts = np.bincount(LABELS[rows], minlength=10)
    share = n * np.bincount(LABELS, minlength=10) / len(LABELS)
    assert np.all(np.abs(counts - share) < 1)  # within one image of its exact share


def test_stratified_is_seeded():
    a, b = stratified_indices(LABELS, 40, rng(1)), stratified_indices(LABELS, 40, rng(1))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stratified_indices(LABELS, 40, rng(2)))


def test_stratified_larger_than_the_split_names_both_sizes():
    with pytest.raises(DataError, match=r"--train-subset 108 exceeds the 107 train images"):
        stratified_indices(LABELS, 108, rng())
    with pytest.raises(DataError, match="at least 1"):
        stratified_indices(LABELS, 0, rng())


def test_per_class_takes_exactly_n_of_each_class():
    labels = np.repeat(np.arange(10), 12)
    rows = per_class_indices(labels, 5, 10, rng())
    assert np.array_equal(np.bincount(labels[rows]), np.full(10, 5))
    assert len(np.unique(rows)) == 50


def test_per_class_names_the_short_class():
    with pytest.raises(DataError, match="exceeds the 0 train images of class 3"):
        per_class_indices(LABELS, 1, 10, rng())  # classes 3..8 are absent
    labels = np.repeat(np.arange(10), 12)
    with pytest.raises(DataError, match="--labels-per-class 13 exceeds the 12"):
        per_class_indices(labels, 13, 10, rng())


def test_random_subset_is_seeded_and_in_range():
    rows = random_indices(1000, 300, rng(4))
    assert len(np.unique(rows)) == 300 and rows.min() >= 0 and rows.max() < 1000
    assert np.array_equal(rows, random_indices(1000, 300, rng(4)))
    with pytest.raises(DataError, match="--pretrain-subset 1,001 exceeds the 1,000"):
        random_indices(1000, 1001, rng())


def _raw(n_per_class: int = 6, unlabeled: int | None = None) -> RawSplits:
    """Images whose first pixel is their row number, so selections can be traced."""
    n = 10 * n_per_class
    x = np.zeros((n, 3, 32, 32), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    y = np.tile(np.arange(10), n_per_class).astype(np.int64)
    u = None
    if unlabeled:
        u = np.zeros((unlabeled, 3, 32, 32), np.uint8)
        u[:, 0, 0, 0] = 200 + np.arange(unlabeled)
    return RawSplits(x, y, x[:10], y[:10], u, origin="memory")


def _ids(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


def test_train_subset_is_also_what_pretraining_sees():
    ds = build_dataset(_raw(), SPECS["cifar10"], train_subset=20, seed=0)
    assert ds.train_images.shape[0] == 20 and ds.pretrain_images is ds.train_images
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((10,), 2))
    assert ds.train_labels.tolist() == [i % 10 for i in _ids(ds.train_images)]


def test_labels_per_class_leaves_pretraining_all_train_images():
    ds = build_dataset(_raw(), SPECS["cifar10"], labels_per_class=1, seed=0)
    assert ds.train_images.shape[0] == 10 and ds.pretrain_images.shape[0] == 60
    assert torch.equal(ds.train_labels.sort().values, torch.arange(10))
    assert ds.train_labels.tolist() == [i % 10 for i in _ids(ds.train_images)]


def test_labels_per_class_draws_from_the_train_subset():
    ds = build_dataset(_raw(), SPECS["cifar10"], train_subset=30, labels_per_class=2)
    subset = build_dataset(_raw(), SPECS["cifar10"], train_subset=30)
    assert set(_ids(ds.train_images)) <= set(_ids(subset.train_images))
    assert _ids(ds.pretrain_images) == _ids(subset.train_images)


def test_pretrain_subset_without_unlabelled_split_draws_from_train_images():
    ds = build_dataset(_raw(), SPECS["cifar10"], train_subset=40, pretrain_subset=15,
                       seed=5)
    assert ds.pretrain_images.shape[0] == 15
    assert set(_ids(ds.pretrain_images)) <= set(_ids(ds.train_images))
    with pytest.raises(DataError, match="exceeds the 40 train images used for pre-training"):
        build_dataset(_raw(), SPECS["cifar10"], train_subset=40, pretrain_subset=41)


def test_pretrain_subset_with_unlabelled_split():
    ds = build_dataset(_raw(unlabeled=25), SPECS["cifar10"], pretrain_subset=9, seed=1)
    ids = _ids(ds.pretrain_images)
    assert len(set(ids)) == 9 and all(200 <= i < 225 for i in ids)
    assert ds.train_images.shape[0] == 60  # the labelled split is untouched
    with pytest.raises(DataError, match="exceeds the 25 unlabelled images"):
        build_dataset(_raw(unlabeled=25), SPECS["cifar10"], pretrain_subset=26)


def test_the_data_seed_picks_the_rows():
    a = build_dataset(_raw(), SPECS["cifar10"], train_subset=20, seed=0)
    b = build_dataset(_raw(), SPECS["cifar10"], train_subset=20, seed=0)
    c = build_dataset(_raw(), SPECS["cifar10"], train_subset=20, seed=1)
    assert _ids(a.train_images) == _ids(b.train_images) != _ids(c.train_images)


# --- the validation subset training is measured on ------------------------------------


def test_validation_is_stratified_seeded_and_disjoint_from_the_bank():
    val, bank = validation_indices(LABELS, None, rng(0))  # default: 10% of 107
    assert len(val) == 11 and np.all(np.diff(val) > 0)
    assert np.array_equal(np.sort(np.concatenate([val, bank])), np.arange(len(LABELS)))
    # Shares of 11: 5.1, 3.1, 2.1, 0.7 -> 5, 3, 2, and class 9 gets its one image.
    assert np.bincount(LABELS[val], minlength=10)[[0, 1, 2, 9]].tolist() == [5, 3, 2, 1]
    again, _ = validation_indices(LABELS, None, rng(0))
    assert np.array_equal(val, again)
    assert not np.array_equal(val, validation_indices(LABELS, None, rng(1))[0])


@pytest.mark.parametrize(("size", "n"), [(0.5, 54), (20, 20), (4, 4), (0.01, 4)])
def test_validation_counts_and_fractions(size, n):
    val, bank = validation_indices(LABELS, size, rng())
    assert len(val) == n  # a fraction below one per class is raised to one per class
    assert set(np.unique(LABELS[val])) == set(np.unique(LABELS[bank])) == {0, 1, 2, 9}


def test_validation_default_is_capped():
    labels = np.repeat(np.arange(10), 6000)  # 60,000 images: 10% would be 6,000
    val, bank = validation_indices(labels, None, rng())
    assert len(val) == 5000 and len(bank) == 55000


@pytest.mark.parametrize(("size", "message"), [
    (3, "--val-size 3 is below the 4 classes"),
    (104, "--val-size 104 leaves no k-NN bank image for some class; choose at most 103"),
    (1.0, "--val-size 1.0 as a fraction must lie in (0, 1)"),
    (0, "--val-size must be at least 1"),
])
def test_validation_sizes_it_cannot_give_are_errors(size, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validation_indices(LABELS, size, rng())


def test_a_class_of_one_image_cannot_be_split():
    with pytest.raises(DataError, match="class 5 has a single labelled train image"):
        validation_indices(np.array([0, 0, 5]), None, rng())
