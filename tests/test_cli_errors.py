"""Bad input from the command line: one line naming the problem and the fix, exit code 2,
no traceback, and nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch

import dinobench.io as io_module
from dinobench import checkpoint
from dinobench.cli import main
from dinobench.runfolder import RunFolder
from helpers import TINY, dinobench, one_line_error

BAD_FLAGS = [
    (["--recipe", "sed"], "invalid choice: 'sed'"),
    (["--studnet-temp", "0.1"], "unrecognized arguments: --studnet-temp"),
    (["--student-temp", "-0.1"], "--student-temp must be positive"),
    (["--teacher-temp", "0"], "--teacher-temp must be positive"),
    (["--center-momentum", "1.5"], "--center-momentum must lie in [0, 1]"),
    (["--teacher-momentum", "-0.2"], "--teacher-momentum must lie in [0, 1]"),
    (["--grid", "5"], "--grid 5 does not divide --image-size 32"),
    (["--batch-size", "1"], "too small for centering"),
    (["--out-dim", "1"], "--out-dim (K) must be at least 2"),
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--resume", "--restart"], "contradict"),
    (["--profile", "fast"], "invalid choice: 'fast'"),
    (["--device", "foo"], "--device 'foo' is not a torch device"),
    (["--seeds", "-1"], "--seeds must be distinct non-negative integers"),
    (["--seeds", "3", "3"], "--seeds must be distinct non-negative integers"),
    (["--depth", "1", "--n-last-blocks", "2"], "--n-last-blocks 2 must lie in [1, --depth 1]"),
    (["--eval-feature", "bogus"], "invalid choice: 'bogus'"),
    (["--batch-size", "4096"], "--batch-size 4096 exceeds the 1,347 pre-training images"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--blur-sigma", "0.1", "inf"], "finite"),
    (["--knn-k", "0"], "--knn-k must be at least 1"),
    (["--budget-seconds", "0"], "--budget-seconds must be a positive number of seconds"),
    (["--budget-seconds", "nan"], "--budget-seconds must be a positive number of seconds"),
    (["--val-size", "ten"], "--val-size takes a count (500) or a fraction (0.1)"),
    (["--val-size", "1.5"], "--val-size 1.5 as a fraction must lie in (0, 1)"),
    (["--val-size", "5"], "--val-size 5 is below the 10 classes"),
    (["--val-size", "1340"], "--val-size 1,340 leaves no k-NN bank image for some class"),
    (["--val-unseen", "--pretrain-subset", "500"],
     "--val-unseen holds the validation images out of pre-training"),
    (["--val-unseen", "--batch-size", "1300"],
     "--batch-size 1300 exceeds the 1,212 pre-training images of digits left by --val-unseen"),
]


def _exit_code(argv: list[str]) -> int:
    """``main``'s exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS,
                         ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(flags, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert _exit_code(["run", *flags, "--out", str(out)]) == 2
    assert expected in one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_bad_flag_from_a_real_process_has_no_traceback(tmp_path):
    done = dinobench("run", "--center-momentum", "2", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "--center-momentum" in one_line_error(done.stderr)
    assert not (tmp_path / "x").exists()


def _unfinished_run(tmp_path, payload: bytes):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "digits_seed0.pt").write_bytes(payload)
    return out


def test_truncated_checkpoint(tmp_path, capsys):
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"dataset": "digits"}, {"w": torch.zeros(1000)})
    out = _unfinished_run(tmp_path, good.read_bytes()[:-300])
    assert main(["run", *TINY, "--epochs", "1", "--resume", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "not a readable checkpoint" in line and "truncated" in line
    assert not (out / "results.json").exists()


def test_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    out = _unfinished_run(tmp_path, foreign.read_bytes())
    assert main(["run", *TINY, "--epochs", "1", "--resume", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert (f"{out / 'checkpoints' / 'digits_seed0.pt'} is not a dinobench checkpoint "
            "(no 'dinobench-checkpoint' tag); delete it or choose another --out") in line
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "digits_seed0.pt").read_bytes() == foreign.read_bytes()


def _checkpoint_of_version(path, version) -> None:
    """A checkpoint as ``checkpoint.save`` writes it, re-saved with another format version."""
    checkpoint.save(path, {"dataset": "digits"}, {"w": torch.zeros(4)})
    obj = torch.load(path, weights_only=True)
    assert obj["version"] == checkpoint.VERSION
    torch.save({**obj, "version": version}, path)


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    _checkpoint_of_version(path, checkpoint.VERSION + 1)
    expected = (f"{path} has checkpoint format version {checkpoint.VERSION + 1}, this "
                f"dinobench reads version {checkpoint.VERSION}; resume it with the dinobench "
                "that wrote it, or start over with --restart")
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(expected)}$"):
        checkpoint.load(path)
    # The version it reads loads.
    checkpoint.save(path, {"dataset": "digits"}, {"w": torch.zeros(4)})
    assert checkpoint.load(path)["version"] == checkpoint.VERSION


def test_resume_from_another_format_version_exits_2(tmp_path, capsys):
    made = tmp_path / "other.pt"
    _checkpoint_of_version(made, 0)
    out = _unfinished_run(tmp_path, made.read_bytes())
    assert main(["run", *TINY, "--epochs", "1", "--resume", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == (f"dinobench run: error: {out / 'checkpoints' / 'digits_seed0.pt'} has "
                    f"checkpoint format version 0, this dinobench reads version "
                    f"{checkpoint.VERSION}; resume it with the dinobench that wrote it, or "
                    "start over with --restart")
    assert not (out / "results.json").exists()
    assert (out / "checkpoints" / "digits_seed0.pt").read_bytes() == made.read_bytes()


def test_unwritable_results_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["run", *TINY, "--epochs", "1", "--out", str(blocker / "run")]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "cannot write" in line and "--out" in line


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """The disk fills while results.json is written over a finished run's: the new bytes
    are in a file but not yet synced. The old results.json stays whole, the temporary
    file is removed, and the error names the file and the fix."""
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()

    real_fsync, failed = io_module.os.fsync, []

    def no_space_for_results(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if "results.json" in name:  # the target itself, or a temporary file for it
            failed.append((name, os.fstat(fd).st_size))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(io_module.os, "fsync", no_space_for_results)
    # Two epochs: results that differ from the first run's.
    assert main(["run", *TINY, "--epochs", "2", "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == (f"dinobench run: error: cannot write {out / 'results.json'}: No space "
                    "left on device; free space or choose another folder with --out")
    assert len(failed) == 1 and failed[0][1] > 0, failed  # it failed with data written
    assert (out / "results.json").read_bytes() == before
    assert not list(out.glob("**/.*.tmp")), "a temporary file was left behind"
    assert not list(out.glob("**/*.tmp"))


def test_a_rerun_removes_temporaries_of_a_killed_run(tmp_path, capsys):
    """A run killed mid-write leaves ``.<name>.<random>.tmp`` files (io.atomic_write_bytes);
    the next run into the folder removes them."""
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    stale = [out / ".results.json.k1ll3d.tmp",
             out / "checkpoints" / ".digits_seed0.pt.x7_q2a.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    assert main(["run", *TINY, "--epochs", "1", "--resume", "--out", str(out)]) == 0
    assert "finished earlier, rows reused" in capsys.readouterr().out
    assert not [p for p in stale if p.exists()]
    assert not list(out.glob("**/.*.tmp"))
    assert (out / "results.json").is_file()


def test_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out):  # a run in progress holds the lock
        assert main(["run", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    assert "another dinobench run" in one_line_error(capsys.readouterr().err)
    assert not (out / "results.json").exists()


def test_report_on_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json" in one_line_error(capsys.readouterr().err)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run folder")
    assert main(["report", str(a_file)]) == 2
    assert "does not exist" in one_line_error(capsys.readouterr().err)


def test_report_on_foreign_json(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"rows": [{"dataset": "x"}]}')
    assert main(["report", str(tmp_path)]) == 2
    assert "not written by dinobench" in one_line_error(capsys.readouterr().err)


def test_a_finished_run_survives_a_rerun_that_fails_validation(tmp_path, capsys):
    """Validation that needs the data (batch larger than the dataset) happens before the
    run folder is touched, so the previous run's results stay."""
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["run", *TINY, "--epochs", "1", "--batch-size", "4096", "--out",
                 str(out)]) == 2
    assert "exceeds" in one_line_error(capsys.readouterr().err)
    assert (out / "results.json").read_bytes() == before
    assert list((out / "checkpoints").glob("*.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_requested_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--device", "cuda", "--out", str(out)]) == 2
    assert "no such CUDA device here; use --device cpu" in one_line_error(
        capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda b: b[:200], "is unreadable ("),  # a disk that filled, a copy that stopped
    (lambda b: b"3", "is not a finished unit's record (no rows)"),  # hand-edited JSON
    (lambda b: b"null", "is not a finished unit's record (no rows)"),
])
def test_resume_over_a_damaged_done_file_names_it_and_its_fix(tmp_path, capsys, damage,
                                                              problem):
    """A finished unit's rows file cut short, or holding JSON that is not its record:
    --resume refuses it in one line naming the file and the fix, and changes nothing; the
    fix it names (delete the file) then works."""
    out = tmp_path / "run"
    flags = [*TINY, "--epochs", "1", "--no-probe", "--eval-every", "0", "--out", str(out)]
    assert main(["run", *flags]) == 0
    done = out / "checkpoints" / "digits_seed0.done.json"
    done.write_bytes(damage(done.read_bytes()))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()

    assert main(["run", *flags, "--resume"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"dinobench run: error: {done} {problem}"), line
    assert line.endswith("; delete it to redo that dataset and seed"), line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing rewritten, nothing added

    done.unlink()
    assert main(["run", *flags, "--resume"]) == 0
    assert "resuming at epoch 2" in capsys.readouterr().out  # the final state, evaluated
    assert json.loads(done.read_text())["rows"]


def test_report_on_invalid_json_names_the_file(tmp_path):
    """results.json cut short: 'report' exits 2 with one line naming the file, from a real
    process (no traceback), and writes no table or figure beside it."""
    (tmp_path / "results.json").write_text('{"meta": {}, "rows": [{"dataset": "digits", ')
    done = dinobench("report", str(tmp_path))
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert line.startswith(f"dinobench report: error: {tmp_path / 'results.json'} is not "
                           "valid JSON (")
    assert line.endswith("); rerun the job that wrote it"), line
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
