"""torchrun with two gloo processes trains the same model as one process with the same
global batch: same loss, center and weights within float tolerance.

Augmentation draws differ per rank by design (each rank has its own stream), so both runs
use augmentations with nothing random left in them (whole-image crops, no flip, blur or
solarisation) and no drop path: then the only difference is how the batch is split.
"""

from __future__ import annotations

import json
import os
import re
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
    odd = tmp_path / "odd"
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dinobench", "run", *TINY, "--batch-size", "63", "--epochs", "1",
         "--out", str(odd)],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    # torchrun exits 1 when a worker fails; the worker that failed first (torchrun then
    # stops the other) exited 2, bad input, with the one-line error and no traceback.
    assert two.returncode == 1, two.stderr[-3000:]
    assert ("dinobench run: error: --batch-size 63 must be a multiple of the 2 processes, "
            "with at least 2 images per process\n") in two.stderr
    assert "[rank" not in two.stderr  # torch's prefix on a worker's traceback
    root = two.stderr.split("Root Cause (first observed failure):")[-1]
    assert re.search(r"exitcode\s*:\s*2 \(pid", root), two.stderr[-3000:]
    assert not odd.exists()  # refused before anything was written


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
    log = stopped / "train_digits_seed0.jsonl"
    wait_for_epochs(log, 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher and both workers
    _, stderr = proc.communicate(timeout=300)
    # torchrun dies of the signal itself (its SignalException: exit 1); it does not pass
    # on its workers' 128 + 15. The only traceback is its own: no worker failed.
    assert proc.returncode == 1 and "got signal: 15" in stderr, stderr[-3000:]
    assert stderr.count("Traceback") == 1, stderr[-3000:]
    state, logged = trainer_state(stopped), log.read_text().splitlines(keepends=True)
    assert len(state["ranks"]) == 2 and state["epoch"] < 4
    assert len(logged) == state["epoch"]  # every finished epoch, logged once saved
    # Each rank took the CLI's signal exit (its line, then 128 + 15), both at the step
    # the checkpoint holds.
    stops = re.findall(r"stopped at epoch (\d+), step (\d+) by signal (\w+); checkpoint "
                       r"saved", stderr)
    assert stops == [(str(state["epoch"] + 1), str(state["step"]), "15")] * 2, stderr

    resumed = subprocess.run(_torchrun(*flags, "--out", str(stopped), "--resume"),
                             capture_output=True, text=True, env=cli_env(), cwd=REPO,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Resumed, not restarted (a deterministic restart ends with the same weights): at the
    # saved step, and the lines logged before the stop kept byte for byte (a redone epoch
    # would have measured other seconds).
    assert (f"resuming at epoch {state['epoch'] + 1}, step {state['step']} from "
            f"{stopped / 'checkpoints' / 'digits_seed0.pt'}") in resumed.stdout
    after = log.read_text().splitlines(keepends=True)
    assert len(after) == 4 and after[:len(logged)] == logged
    a, b = trainer_state(alone), trainer_state(stopped)
    for part in ("student", "teacher"):
        for name, t in a[part].items():
            assert torch.equal(b[part][name], t), f"{part}.{name} differs"
    assert torch.equal(a["center"], b["center"])


def _worker_pid(launcher: int, rank: int, timeout: float = 60.0) -> int:
    """The pid of the torchrun worker of ``rank`` (from /proc: the launcher's children,
    told apart by the RANK in their environment)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = open(f"/proc/{launcher}/task/{launcher}/children").read().split()
        for pid in children:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_a_signal_to_one_rank_stops_both_and_each_names_it(tmp_path):
    """SIGTERM to rank 1 alone: rank 0 stops at the same step (the agreement over the gloo
    group), and both report the signal rank 1 received and exit with 128 + 15, where rank
    0, which received none, once had no signal number to report or exit with."""
    out = tmp_path / "one"
    proc = subprocess.Popen(_torchrun(*TINY, "--epochs", "4", "--checkpoint-every", "1",
                                      "--device", "cpu", "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO, start_new_session=True)
    wait_for_epochs(out / "train_digits_seed0.jsonl", 1, proc)
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    state = trainer_state(out)
    stops = re.findall(r"stopped at epoch (\d+), step (\d+) by signal (\w+); checkpoint "
                       r"saved", stderr)
    assert stops == [(str(state["epoch"] + 1), str(state["step"]), "15")] * 2, stderr[-3000:]
    assert "TypeError" not in stderr and proc.returncode != 0
    # torchrun names the first worker to fail with its exit code: 128 + SIGTERM.
    assert re.search(r"exitcode\s*:\s*143", stderr), stderr[-3000:]
