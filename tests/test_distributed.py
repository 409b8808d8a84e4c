"""torchrun with two gloo processes trains the same model as one process with the same
global batch: same loss, center and weights within float tolerance.

Augmentation draws differ per rank by design (each rank has its own stream), so both runs
use augmentations with nothing random left in them (whole-image crops, no flip, blur or
solarisation) and no drop path: then the only difference is how the batch is split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY, cli_env, dinobench, rows, trainer_state, wait_for_epochs

pytestmark = pytest.mark.slow

FIXED_AUG = ["--global-scale", "1", "1", "--local-scale", "1", "1", "--flip-p", "0",
             "--blur-p", "0", "0", "0", "--solarize-p", "0", "--drop-path", "0"]
# The seed recipe: the small one's head batch norm makes the biases before it (and the
# backbone's final norm bias) directions of zero true gradient, which AdamW turns
# rounding into full-size steps along, so two summation orders part by more than
# rounding; and after two epochs of a tiny ViT its features are so alike that rounding
# moves k-NN votes. tests/test_batch_norm.py checks that norm across two processes.
FLAGS = [*TINY, *FIXED_AUG, "--recipe", "seed", "--epochs", "2", "--checkpoint-every", "1"]


def _history(out):
    return [json.loads(line) for line in (out / "train_digits_seed0.jsonl").read_text()
            .splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    one = dinobench("run", *FLAGS, "--out", str(single))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dinobench", "run", *FLAGS, "--device", "cpu", "--out", str(multi)],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = trainer_state(single), trainer_state(multi)
    assert a["step"] == b["step"]
    for part in ("student", "teacher"):
        for name, t in a[part].items():
            torch.testing.assert_close(b[part][name], t, rtol=1e-4, atol=1e-5,
                                       msg=f"{part}.{name}")
    torch.testing.assert_close(b["center"], a["center"], rtol=1e-4, atol=1e-5)
    for ha, hb in zip(_history(single), _history(multi), strict=True):
        assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-4)
        assert hb["teacher_entropy"] == pytest.approx(ha["teacher_entropy"], rel=1e-4)
        # The batch-mean target is taken over the global batch, not each rank's half.
        assert hb["marginal_entropy"] == pytest.approx(ha["marginal_entropy"], rel=1e-4)

    # Only rank 0 wrote results, and the evaluation (features gathered across ranks)
    # gives the same table.
    ra, rb = (rows(out) for out in (single, multi))  # without the wall-clock timings
    assert [r["value"] for r in rb] == pytest.approx([r["value"] for r in ra], abs=0.5)
    assert json.loads((multi / "results.json").read_text())["meta"]["world_size"] == 2


def test_batch_must_split_evenly_across_processes(tmp_path):
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dinobench", "run", *TINY, "--batch-size", "63", "--epochs", "1",
         "--out", str(tmp_path / "odd")],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert two.returncode != 0
    assert "multiple of the 2 processes" in two.stderr


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", "-m", "dinobench", "run", *args]


def test_sigterm_stops_every_rank_together_and_resume_is_exact(tmp_path):
    """A signal stops both processes at the same step (an agreement over a gloo group),
    each rank's random streams go into the checkpoint, and a resumed two-process run
    ends bit-identical to one left alone."""
    flags = [*TINY, "--epochs", "4", "--checkpoint-every", "1", "--deterministic",
             "--device", "cpu", "--drop-path", "0.1"]
    alone, stopped = tmp_path / "alone", tmp_path / "stopped"
    done = subprocess.run(_torchrun(*flags, "--out", str(alone)), capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_torchrun(*flags, "--out", str(stopped)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO, start_new_session=True)
    wait_for_epochs(stopped / "train_digits_seed0.jsonl", 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both workers
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    state = trainer_state(stopped)
    assert len(state["ranks"]) == 2 and state["epoch"] < 4

    resumed = subprocess.run(_torchrun(*flags, "--out", str(stopped), "--resume"),
                             capture_output=True, text=True, env=cli_env(), cwd=REPO,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = trainer_state(alone), trainer_state(stopped)
    for part in ("student", "teacher"):
        for name, t in a[part].items():
            assert torch.equal(b[part][name], t), f"{part}.{name} differs"
    assert torch.equal(a["center"], b["center"])
