"""Faults a long run must not hide: a non-finite loss stops the run and keeps the last
good checkpoint; a collapsed teacher is flagged and never averaged in."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dinobench.dino.train as train_module
from dinobench.cli import main
from dinobench.dino.faults import collapse_reason
from dinobench.report import summarize, to_markdown
from helpers import TINY

LOG_10 = math.log(10)


def _history(entropies, marginals=None, kl=0.0, log_k=LOG_10):
    """Epoch records; by default the batch-mean target is as sharp as each image's (every
    image on the same output) and the student has caught up (KL 0)."""
    marginals = entropies if marginals is None else marginals
    return [{"teacher_entropy": h, "marginal_entropy": m, "kl": kl, "log_k": log_k}
            for h, m in zip(entropies, marginals, strict=True)]


def test_collapse_reason_bands():
    log_k = math.log(10)
    assert collapse_reason(_history([1.2, 1.1, 1.0])) is None
    assert "one output" in collapse_reason(_history([1.5, 0.01, 0.02, 0.0]))
    # Just as sharp per image, but the images spread over the outputs: the teacher DINO
    # aims for, not a collapse.
    assert collapse_reason(_history([1.5, 0.01, 0.02, 0.0], [2.0, 2.1, 2.2, 2.2])) is None
    # A student still far from the teacher (KL well above 0) has not collapsed yet.
    assert collapse_reason(_history([1.5, 0.01, 0.02, 0.0], kl=1.0)) is None
    assert "uniform" in collapse_reason(_history([0.5, log_k, 0.999 * log_k, log_k]))
    # Only the tail counts: a teacher that starts uniform and then learns is fine.
    assert collapse_reason(_history([log_k, log_k, log_k, 1.0])) is None
    assert collapse_reason([]) is None
    # A run that lasted one epoch is judged on it, and says so.
    assert "uniform" in collapse_reason(_history([log_k]))
    assert "in its only epoch" in collapse_reason(_history([log_k]))
    assert "for the last 3 epochs" in collapse_reason(_history([log_k] * 4))


def test_planted_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    real_loss = train_module.dino_loss
    calls = {"n": 0}
    bad_step = 30  # in epoch 2 (21 steps per epoch at batch 64 on 1,347 images)

    def loss_with_a_nan(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == bad_step + 1 else loss

    monkeypatch.setattr(train_module, "dino_loss", loss_with_a_nan)
    out = tmp_path / "nan"
    code = main(["run", *TINY, "--epochs", "3", "--checkpoint-every", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"non-finite (NaN or inf) at step {bad_step}" in err
    state = torch.load(out / "checkpoints" / "digits_seed0.pt", weights_only=True)
    assert state["trainer"]["epoch"] == 1  # the checkpoint from before the NaN
    assert all(torch.isfinite(t).all() for t in state["trainer"]["student"].values())
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_uniform_teacher_is_flagged_and_left_out_of_the_mean(tmp_path, capsys):
    """Teacher temperature 1 with a K = 10 linear head: the teacher output stays uniform
    (entropy log K), a known collapse."""
    out = tmp_path / "collapse"
    code = main(["run", *TINY, "--recipe", "seed", "--epochs", "3", "--teacher-temp", "1",
                 "--warmup-teacher-temp", "1", "--seeds", "0", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "collapsed" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    dino = [r for r in rows if r["model"].startswith("dino")]
    assert {r["seed"] for r in dino} == {0, 1} and all(r["collapsed"] for r in dino)
    assert all("uniform" in r["collapse_reason"] for r in dino)
    assert not any(r["collapsed"] for r in rows if r["model"] == "random-init")
    summary = {s["model"]: s for s in summarize(rows) if s["metric"] == "knn_top1"}
    assert summary["dino-seed"]["n"] == 0 and summary["dino-seed"]["n_collapsed"] == 2
    assert summary["random-init"]["n"] == 2
    assert "collapsed" in to_markdown(rows)
    log = [json.loads(x) for x in (out / "train_digits_seed0.jsonl").read_text().split("\n")
           if x]
    assert log[-1]["teacher_entropy"] > 0.95 * math.log(10)
