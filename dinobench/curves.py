"""Measuring a run while it trains: the validation subset, the per-epoch evaluator and
the learning curves (per epoch and per second of training) drawn from its records.

Training-time accuracy is measured on a fixed validation subset held out from the train
split (k-NN bank: the rest of the train split), never on the test split, which only the
final evaluation reads. By default the held-out images stay in the pre-training set (DINO
never sees their labels), so the validation queries are images the model trained on,
where the test split's are not; on MNIST that reads about 0.3 points of k-NN higher than
the same images held out (docs/metrics.md). :func:`hold_out_of_pretraining`
(``--val-unseen``) takes them out of pre-training too, so validation reads as test does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.registry import Dataset
from .data.subsets import validation_indices
from .errors import ConfigError
from .eval.features import extract_features
from .eval.knn import knn_top1
from .eval.linear_probe import linear_probe
from .eval.time_to_accuracy import knn_levels

if TYPE_CHECKING:
    from .experiments import EvalConfig


def validation_split(ds: Dataset, size: int | float | None = None, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, k-NN bank rows) of ``ds``'s labelled train split, stratified
    (see :func:`~dinobench.data.subsets.validation_indices`). A data seed, fixed by
    default, so every training seed of a run is measured on the same images."""
    val, bank = validation_indices(ds.train_labels.numpy(), size,
                                   np.random.default_rng([seed, 4]))
    return torch.from_numpy(val), torch.from_numpy(bank)


def hold_out_of_pretraining(ds: Dataset, rows: torch.Tensor) -> Dataset:
    """``ds`` with the labelled train ``rows`` (the validation images) left out of its
    pre-training images. Only where the model pre-trains on the labelled train split
    itself: with an unlabelled split (STL-10's) the validation images are unseen already,
    and with --pretrain-subset or --labels-per-class the two sets are other rows, so
    :func:`check_hold_out` refuses those first."""
    check_hold_out(ds)
    keep = torch.ones(ds.train_images.shape[0], dtype=torch.bool)
    keep[rows] = False
    return dataclasses.replace(ds, pretrain_images=ds.train_images[keep])


def check_hold_out(ds: Dataset) -> None:
    if ds.pretrain_images is not ds.train_images:
        raise ConfigError(
            f"--val-unseen holds the validation images out of pre-training, which needs "
            f"{ds.name} to pre-train on its labelled train split; here it pre-trains on "
            "other images (an unlabelled split, whose validation images are unseen "
            "already, or --pretrain-subset / --labels-per-class); drop --val-unseen")


def supervised_curve(dataset: str, history: list[dict], n_labels: int, seed: int) -> dict:
    return {"dataset": dataset, "model": "supervised", "seed": seed,
            "label": f"supervised, {n_labels} labels",
            "epoch": [h["epoch"] for h in history],
            "loss": [h["train_loss"] for h in history], "loss_name": "cross-entropy",
            "train_top1": [h["train_top1"] for h in history],
            "test_top1": [h["test_top1"] for h in history]}


def dino_curve(dataset: str, model: str, history: list[dict], seed: int) -> dict:
    """Learning curve of a DINO run from the trainer's per-epoch records (those written
    by :func:`dino_epoch_evaluator` carry the validation accuracies; other epochs hold
    None), against the epoch and against the training time (``train_seconds``), with the
    dataset's time-to-accuracy levels (for the k-NN versus time figure)."""
    return {"dataset": dataset, "model": model, "seed": seed, "label": f"{model} (no labels)",
            "epoch": [h["epoch"] for h in history],
            "train_seconds": [h.get("train_seconds") for h in history],
            "step": [h.get("step") for h in history],
            "loss": [h["loss"] for h in history], "loss_name": "DINO loss",
            "train_top1": [h.get("probe_train_top1") for h in history],
            "val_top1": [h.get("val_knn_top1") for h in history],
            "val_probe_top1": [h.get("val_probe_top1") for h in history],
            "levels": list(knn_levels(dataset))}


def dino_epoch_evaluator(ds: Dataset, *, every: int, epochs: int,
                         val: tuple[torch.Tensor, torch.Tensor] | None = None,
                         cfg: EvalConfig | None = None, labelled: torch.Tensor | None = None,
                         probe: bool = False, device=None, k: int = 20,
                         temperature: float = 0.07) -> Callable[..., dict | None]:
    """``on_epoch_end`` hook for :class:`DINOTrainer`: every ``every`` epochs, at the
    last, and whenever called with ``final=True`` (a time budget ended training there),
    the teacher's k-NN top-1 (``k``, ``temperature``, on the final table's features:
    ``cfg.patch_mean``) on the validation subset ``val`` = (validation rows, bank rows)
    of the train split (default: :func:`validation_split`), the bank being the rest of
    the train split: ``val_knn_top1``. The test split is never
    looked at during training. With ``probe``, a linear probe (one C = 1.0, to stay
    cheap; the final probe searches the grid) fit on the ``labelled`` bank images:
    ``probe_train_top1`` and ``val_probe_top1``."""
    if every < 1:
        raise ValueError(f"--eval-every must be at least 1, got {every}")
    rows, bank = val if val is not None else validation_split(ds)
    labels = ds.train_labels
    batch_size = cfg.batch_size if cfg is not None else 256
    patch_mean = cfg is not None and cfg.patch_mean

    def evaluate(epoch: int, teacher, final: bool = False) -> dict | None:
        if not final and (epoch + 1) % every and epoch + 1 != epochs:
            return None
        backbone = getattr(teacher, "backbone", teacher)
        train = extract_features(backbone, ds.train_images, ds.spec.mean, ds.spec.std,
                                 batch_size=batch_size, device=device,
                                 patch_mean=patch_mean)
        out = {"val_knn_top1": knn_top1(train[bank], labels[bank], train[rows], labels[rows],
                                        k=k, temperature=temperature,
                                        num_classes=ds.spec.num_classes)}
        if probe:
            fit = bank if labelled is None else bank[torch.isin(bank, labelled)]
            p = linear_probe(train.cpu()[fit], labels[fit], train.cpu()[rows], labels[rows],
                             Cs=(1.0,))
            out.update(probe_train_top1=p.train_top1, val_probe_top1=p.top1)
        return out

    return evaluate
