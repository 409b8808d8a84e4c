"""--val-unseen: the validation images held out of pre-training, so the validation k-NN
queries images the model never trained on, as the test split's are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dinobench.cli import build_parser
from dinobench.curves import hold_out_of_pretraining, validation_split
from dinobench.data import SPECS
from dinobench.data.registry import Dataset
from dinobench.data.subsets import validation_indices
from dinobench.errors import ConfigError
from dinobench.report import to_markdown
from dinobench.sweep import _grid, _header, options_from_args


def _numbered(n: int = 60) -> Dataset:
    """Images whose first pixel is their row number, so each row can be told apart."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return Dataset(SPECS["digits"], images, labels, images[:10].clone(), labels[:10].clone())


def test_hold_out_leaves_out_exactly_the_validation_rows_in_order():
    ds = _numbered()
    rows, bank = validation_split(ds, 12)
    held = hold_out_of_pretraining(ds, rows)
    seen = held.pretrain_images[:, 0, 0, 0].tolist()
    # Brute force: every row number but the validation rows, in their order.
    assert seen == [i for i in range(60) if i not in set(rows.tolist())]
    assert sorted(seen) == sorted(bank.tolist())
    # The labelled split (k-NN bank, validation queries, probes) and the test split stay.
    assert held.train_images is ds.train_images and held.test_images is ds.test_images
    assert torch.equal(held.train_labels, ds.train_labels)
    assert ds.pretrain_images.shape[0] == 60  # the original is left as it was


@pytest.mark.parametrize("other", ["unlabelled split", "subset"])
def test_refused_where_the_model_pretrains_on_other_images(other):
    ds = _numbered()
    ds.pretrain_images = (torch.zeros(30, 1, 4, 4, dtype=torch.uint8) if other ==
                          "unlabelled split" else ds.train_images[:50].clone())
    with pytest.raises(ConfigError, match="--val-unseen .* drop --val-unseen"):
        hold_out_of_pretraining(ds, torch.tensor([0, 1]))


@pytest.mark.parametrize("val_size", [None, 200])
def test_a_run_pretrains_on_the_bank_alone_and_says_so(val_size, tmp_path, monkeypatch):
    from dinobench.checkpoint import CheckpointError
    from dinobench.dino.train import DINOTrainer
    from dinobench.run import RunOptions, run

    fed = []
    original = DINOTrainer.fit

    def spy(self, images, **kw):
        fed.append(images)
        return original(self, images, **kw)

    monkeypatch.setattr(DINOTrainer, "fit", spy)
    tiny = dict(depth=1, dim=32, heads=2, mlp_dim=64, batch_size=128, n_local=2, epochs=1)
    opts = dict(datasets=["digits"], seeds=[0], out=tmp_path / "r", progress=False,
                probe=False, attention_images=2, val_size=val_size, overrides=tiny)
    lines = []
    run(RunOptions(val_unseen=True, **opts), log=lines.append)

    from dinobench.data import load_dataset
    ds = load_dataset("digits")
    # The validation rows drawn here from the data seed, not by the run's own helpers.
    val = validation_indices(ds.train_labels.numpy(), val_size,
                             np.random.default_rng([0, 4]))[0]
    keep = np.setdiff1d(np.arange(ds.train_images.shape[0]), val)
    assert len(fed) == 1 and torch.equal(fed[0], ds.train_images[torch.from_numpy(keep)])
    assert any(f"{len(keep):,} pre-training images" in line for line in lines)
    result = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["meta"]["val_unseen"] is True
    assert "held out of pre-training (--val-unseen)" in (tmp_path / "r" / "results.md").read_text()
    # The validation k-NN is still measured, on the held-out rows.
    val_rows = [r for r in result["rows"] if r["metric"] == "val_knn_top1"]
    assert val_rows and all(r["n_val"] == len(val) for r in val_rows)
    # A run that pre-trained without them is not taken for one that pre-trained on them.
    with pytest.raises(CheckpointError, match=r"the run differs from the one saved \(.*"
                                              r"val_unseen: True -> None.*\); resume with "
                                              r"the same flags and data, or start over "
                                              r"with --restart$"):
        run(RunOptions(resume=True, **opts), log=lambda m: None)


def test_the_sweep_passes_it_on_and_says_which_validation_it_read():
    plain = options_from_args(build_parser().parse_args(["sweep"]))
    unseen = options_from_args(build_parser().parse_args(["sweep", "--val-unseen"]))
    assert _grid(unseen)["run"]["val_unseen"] is True
    # Off, it stays out of the sweep's identity, as in sweeps made before the flag, so
    # those resume with their own command and find their finished runs.
    assert "val_unseen" not in _grid(plain)["run"]
    assert "held out of pre-training" in _header(unseen, 0)
    assert "also pre-trained on" in _header(plain, 0)


@pytest.mark.parametrize(("meta", "expected"), [
    ({"val_unseen": True}, "held out of pre-training"),
    ({"val_unseen": False}, "also pre-trained on"),
    ({}, None),  # results written before the flag: no claim either way
])
def test_results_md_says_which_validation_it_read(meta, expected):
    rows = [{"dataset": "digits", "model": "dino-small", "metric": m, "value": v, "seed": 0}
            for m, v in [("knn_top1", 90.0), ("val_knn_top1", 91.0),
                         ("time_to_knn", 12.0)]]
    rows[-1].update(threshold=50.0, steps=10)
    md = to_markdown(rows, meta)
    if expected is None:
        assert "pre-training" not in md
    else:
        assert expected in md and "Time to validation k-NN" in md
