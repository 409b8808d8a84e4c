"""Time to accuracy: the levels read off a synthetic validation curve, the cost rows, the
Markdown rendering of a level never reached, and a time budget through the CLI."""

from __future__ import annotations

import json

import pytest

from dinobench.eval.time_to_accuracy import (
    KNN_LEVELS,
    first_reaching,
    knn_levels,
    time_to_knn,
    training_scores,
)
from dinobench.report import summarize, to_markdown
from helpers import TINY, dinobench

# A synthetic run: 10 steps of 64 images an epoch, 2.5 s of training an epoch, validation
# k-NN measured every other epoch (None between), falling back once after a peak.
CURVE = [None, 48.0, None, 80.0, None, 79.0, None, 90.0, None, 89.5]
HISTORY = [{"epoch": e + 1, "step": 10 * (e + 1), "train_seconds": 2.5 * (e + 1),
            "eval_seconds": 0.0 if v is None else 0.5, "images_seen": 640 * (e + 1),
            **({} if v is None else {"val_knn_top1": v})} for e, v in enumerate(CURVE)]


def test_levels_are_read_at_the_first_evaluation_at_or_above_them():
    scores = {s["threshold"]: s for s in time_to_knn(HISTORY, (40.0, 50.0, 80.0, 95.0))}
    # 40%: epoch 2 (48%); 50%: epoch 4 (80%, skipping the unevaluated epoch 3); 80%:
    # reached exactly at epoch 4 (at or above counts); 95%: never.
    assert (scores[40.0]["value"], scores[40.0]["steps"]) == (5.0, 20)
    assert (scores[50.0]["value"], scores[50.0]["steps"]) == (10.0, 40)
    assert (scores[80.0]["value"], scores[80.0]["images_seen"]) == (10.0, 2560)
    assert scores[95.0]["value"] is None and scores[95.0]["steps"] is None
    assert all(s["metric"] == "time_to_knn" for s in scores.values())
    assert first_reaching(HISTORY, 89.9)["epoch"] == 8  # the later dip changes nothing
    assert first_reaching([], 10.0) is None


def test_training_scores_are_the_run_totals():
    got = {s["metric"]: s for s in training_scores(HISTORY)}
    assert got["train_seconds"]["value"] == 25.0 and got["train_seconds"]["steps"] == 100
    assert got["eval_seconds"]["value"] == pytest.approx(2.5)  # 5 evaluations of 0.5 s
    assert got["images_per_s"]["value"] == pytest.approx(6400 / 25.0)
    assert training_scores([]) == []


# The levels docs/metrics.md gives for each dataset family (time_to_knn).
DOCUMENTED_LEVELS = {
    "digits": (50.0, 80.0, 90.0, 95.0),
    "mnist": (50.0, 80.0, 90.0, 95.0),
    "cifar10": (40.0, 60.0, 80.0),
    "stl10": (30.0, 40.0, 50.0, 60.0),
    # Composites, mnist-<background>-<size>, every background and size alike.
    "mnist-none-32": (30.0, 50.0, 70.0, 90.0),
    "mnist-cifar10-64": (30.0, 50.0, 70.0, 90.0),
    "mnist-natural-96": (30.0, 50.0, 70.0, 90.0),
}


@pytest.mark.parametrize("dataset", [*DOCUMENTED_LEVELS, "other"])
def test_every_dataset_has_levels(dataset):
    """The levels are the ones the metrics page lists (a dataset it does not list still
    gets some), each a percentage strictly between 0 and 100, in increasing order."""
    levels = knn_levels(dataset)
    if dataset in DOCUMENTED_LEVELS:
        assert levels == DOCUMENTED_LEVELS[dataset]
    assert isinstance(levels, tuple) and len(levels) >= 2
    assert all(0.0 < v < 100.0 for v in levels)
    assert all(a < b for a, b in zip(levels, levels[1:]))
    assert set(KNN_LEVELS) <= set(DOCUMENTED_LEVELS)  # no family left undocumented


def _rows(seed: int, values: dict) -> list[dict]:
    return [{"dataset": "d", "model": "dino-x", "metric": "time_to_knn", "threshold": t,
             "value": v, "steps": None if v is None else 10, "seed": seed}
            for t, v in values.items()] + [
        {"dataset": "d", "model": "dino-x", "metric": "knn_top1", "value": 60.0,
         "seed": seed}]


def test_levels_are_grouped_apart_and_not_reached_reads_so():
    rows = _rows(0, {50.0: 10.0, 80.0: None, 90.0: None}) + _rows(
        1, {50.0: 14.0, 80.0: 30.0, 90.0: None})
    by = {s["threshold"]: s for s in summarize(rows) if s["metric"] == "time_to_knn"}
    assert by[50.0]["mean"] == 12.0 and by[50.0]["n"] == 2  # not averaged across levels
    assert (by[80.0]["n"], by[80.0]["n_missing"]) == (1, 1)
    md = to_markdown(rows)
    table = md.split("## Time to validation k-NN")[1].split("##")[0]
    assert "| dataset | model | ≥ 50% | ≥ 80% | ≥ 90% |" in table
    assert "| d | dino-x | 12.00 ± 2.83 | 30.00 (1/2 reached) | not reached |" in table
    assert "| d | dino-x | time_to_knn @ 90% | not reached | 2 |" in md
    json.dumps(rows)  # None, not NaN: valid JSON


@pytest.mark.slow
def test_a_budget_cuts_the_run_and_its_rows_say_so(tmp_path):
    out = tmp_path / "run"
    done = dinobench("run", *TINY, "--epochs", "200", "--budget-seconds", "3",
                     "--no-probe", "--out", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    dino = [r for r in rows if r["model"] == "dino-small"]  # the default recipe
    assert all(r["budget_seconds"] == 3.0 and r["budget_stop"] for r in dino)
    assert 0 < dino[0]["epochs_done"] < 200 and dino[0]["epochs"] == 200
    history = [json.loads(line) for line in
               (out / "train_digits_seed0.jsonl").read_text().splitlines()]
    # Stopped at the first step past the budget, and evaluated there.
    assert 3.0 < history[-1]["train_seconds"] < 3.0 + 2.0
    assert "val_knn_top1" in history[-1] and "knn_top1" not in history[-1]
    assert history[-1]["step"] == round(dino[0]["epochs_done"] * 21)  # 1347 // 64 steps
    train = next(r for r in dino if r["metric"] == "train_seconds")
    assert train["value"] == history[-1]["train_seconds"]
    levels = [r["threshold"] for r in dino if r["metric"] == "time_to_knn"]
    assert levels == [50.0, 80.0, 90.0, 95.0]
    curve = data["figures"]["curves"][0]
    assert curve["train_seconds"][-1] == history[-1]["train_seconds"]
    assert (out / "knn_vs_time.png").stat().st_size > 1000
