"""Checkpoints and exact resume: a run killed part-way and resumed ends bit-identical
(weights and result rows) to the same run left alone, on CPU in deterministic mode."""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest
import torch

from helpers import (
    TINY,
    dinobench,
    one_line_error,
    popen,
    rows,
    trainer_state,
    wait_for_epochs,
)

pytestmark = pytest.mark.slow

FLAGS = [*TINY, "--epochs", "5", "--checkpoint-every", "1", "--deterministic"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run left alone."""
    out = tmp_path_factory.mktemp("reference")
    done = dinobench("run", *FLAGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def _killed_after(out, epochs: int):
    """Start the run into ``out`` and SIGKILL it once ``epochs`` epochs are logged."""
    proc = popen("run", *FLAGS, "--out", str(out))
    wait_for_epochs(out / "train_digits_seed0.jsonl", epochs, proc)
    proc.kill()
    proc.wait()
    return proc


def _log_lines(out) -> list[str]:
    return (out / "train_digits_seed0.jsonl").read_text().splitlines(keepends=True)


def _assert_resumed(resumed, out, saved: dict, logged: list[str]) -> None:
    """The rerun continued from the checkpoint, not from scratch (a deterministic restart
    would end with the same weights): it says so at the saved epoch and step, and the
    log lines written before the stop are kept byte for byte - a redone epoch would have
    other wall-clock fields (``seconds``, ``images_per_s``, ``train_seconds``)."""
    assert (f"resuming at epoch {saved['epoch'] + 1}, step {saved['step']} from "
            f"{out / 'checkpoints' / 'digits_seed0.pt'}") in resumed.stdout
    assert saved["step"] > 0 and logged
    after = _log_lines(out)
    assert len(after) == 5 and after[:len(logged)] == logged


def _assert_same_run(a, b):
    sa, sb = trainer_state(a), trainer_state(b)
    for part in ("student", "teacher"):
        assert sa[part].keys() == sb[part].keys()
        for name in sa[part]:
            assert torch.equal(sa[part][name], sb[part][name]), f"{part}.{name} differs"
    assert torch.equal(sa["center"], sb["center"])
    assert rows(a) == rows(b)


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    out = tmp_path / "killed"
    proc = _killed_after(out, 2)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    saved, logged = trainer_state(out), _log_lines(out)
    assert saved["epoch"] >= len(logged) >= 2  # each epoch is saved before it is logged

    again = dinobench("run", *FLAGS, "--out", str(out))  # forgetting --resume is refused
    assert again.returncode == 2
    assert "--resume" in one_line_error(again.stderr)

    resumed = dinobench("run", *FLAGS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_resumed(resumed, out, saved, logged)
    _assert_same_run(reference, out)
    assert not list(out.glob("**/.*.tmp"))


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(reference, tmp_path):
    out = tmp_path / "terminated"
    proc = popen("run", *FLAGS, "--out", str(out))
    wait_for_epochs(out / "train_digits_seed0.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr and "checkpoint saved" in stderr
    state, logged = trainer_state(out), _log_lines(out)
    assert state["epoch"] < 5 and state["order"] is not None  # saved inside an epoch
    assert len(logged) == state["epoch"]  # every finished epoch, logged once saved
    # The stop is reported where the checkpoint holds it.
    assert re.search(rf"stopped at epoch {state['epoch'] + 1}, step {state['step']} by "
                     rf"signal {int(signal.SIGTERM)}; checkpoint saved", stderr), stderr

    resumed = dinobench("run", *FLAGS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_resumed(resumed, out, state, logged)
    _assert_same_run(reference, out)


def test_resume_with_other_flags_is_refused(reference, tmp_path):
    out = tmp_path / "changed"
    _killed_after(out, 1)
    changed = dinobench("run", *FLAGS, "--student-temp", "0.5", "--out", str(out),
                        "--resume")
    assert changed.returncode == 2
    line = one_line_error(changed.stderr)
    assert "cannot resume" in line and "student_temp" in line
    restarted = dinobench("run", *FLAGS, "--out", str(out), "--restart")
    assert restarted.returncode == 0, restarted.stderr


def test_resume_of_a_finished_run_reuses_its_rows(reference, tmp_path):
    finished = tmp_path / "finished"  # a copy: the other tests compare with the reference
    shutil.copytree(reference, finished)
    ckpt = finished / "checkpoints" / "digits_seed0.pt"
    done = finished / "checkpoints" / "digits_seed0.done.json"
    log = finished / "train_digits_seed0.jsonl"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (ckpt, done, log)}
    results = json.loads((finished / "results.json").read_text())

    again = dinobench("run", *FLAGS, "--out", str(finished), "--resume")
    assert again.returncode == 0, again.stderr
    assert "finished earlier" in again.stdout and "resuming" not in again.stdout
    # Nothing trained or saved again: the checkpoint, the saved rows and the training log
    # are untouched, and the rows written are the saved ones with their wall-clock
    # timings (a rerun would have measured new ones).
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    rewritten = json.loads((finished / "results.json").read_text())
    assert rewritten["rows"] == results["rows"]
    assert rewritten["figures"] == results["figures"]
    assert rewritten["meta"]["precision"] == "fp32"  # auto on a CPU


def test_resume_of_a_finished_run_with_other_flags_is_refused(reference):
    """Rows of a finished run are reused only for the flags that made them: a changed
    recipe or a changed evaluation is refused, not answered with the old rows."""
    for flag, value, named in (("--student-temp", "0.5", "student_temp"),
                               ("--knn-k", "5", "knn"),
                               ("--precision", "bf16", "precision")):
        changed = dinobench("run", *FLAGS, flag, value, "--out", str(reference), "--resume")
        assert changed.returncode == 2, changed.stderr
        line = one_line_error(changed.stderr)
        assert "cannot resume" in line and named in line, line
