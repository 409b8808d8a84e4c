"""Data errors from the command line: exit code 2, one line naming the problem and the
fix, no traceback, and nothing written (the run folder is never created).

Every case writes its (broken) files into a temporary data dir, then runs
``dinobench run`` in-process; two cases also run as a real subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from test_data_layouts import (
    small_cifar10,
    small_mnist,
    small_stl10,
    write_cifar10_batches,
    write_mnist_idx,
    write_npz,
    write_stl10_binary,
)

from dinobench.cli import main
from helpers import REAL_DATA


def mnist_npz(data_dir: Path, **changes) -> Path:
    """A valid small mnist.npz, with ``changes`` replacing (or, as None, dropping) keys."""
    x_train, y_train, x_test, y_test = small_mnist()
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    arrays.update(changes)
    return write_npz(data_dir, "mnist", **{k: v for k, v in arrays.items() if v is not None})


def corrupt_npz_member(data_dir: Path) -> None:
    path = mnist_npz(data_dir)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"x_train.npy") + 200  # inside the stored array data
    raw[start:start + 64] = bytes(64)  # fails the member's CRC-32
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    """Cut a file to a bit less than half (an odd size, so no whole number of records)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 - 7])


def bad_stl_labels(data_dir: Path) -> None:
    folder = write_stl10_binary(data_dir, *small_stl10())
    labels = bytearray((folder / "train_y.bin").read_bytes())
    labels[0] = 0  # STL-10 label files count 1..10
    (folder / "train_y.bin").write_bytes(bytes(labels))


def offline_torchvision(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\n<urlopen error "
                           "[Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd, "CIFAR10", fail)


# (id, dataset(s), files to write into the data dir, extra flags, words the message holds)
CASES = [
    ("unknown-dataset", ["mnist", "imagenet"], None, [],
     ["unknown dataset 'imagenet'", "known datasets", "mnist", "cifar10", "stl10", "digits"]),
    ("missing-mnist", ["mnist"], None, [],
     ["mnist not found", "mnist.npz", "MNIST/raw", "--download", "--data-dir"]),
    ("missing-cifar10", ["cifar10"], lambda d: d.mkdir(), [],
     ["cifar10 not found", "cifar10.npz", "cifar-10-batches-py", "--download", "internet"]),
    ("missing-stl10", ["stl10"], lambda d: d.mkdir(), [],
     ["stl10 not found", "stl10.npz", "stl10_binary", "--download"]),
    ("missing-one-file", ["mnist"],
     lambda d: (write_mnist_idx(d, *small_mnist()) / "t10k-labels-idx1-ubyte").unlink(), [],
     ["has no t10k-labels-idx1-ubyte", "--download", "mnist.npz"]),
    ("second-dataset-missing", ["mnist", "cifar10"], mnist_npz, [],
     ["cifar10 not found", "--download"]),
    ("npz-not-a-zip", ["mnist"],
     lambda d: (d.mkdir(), (d / "mnist.npz").write_bytes(b"not a zip archive" * 10)), [],
     ["mnist.npz is corrupt, truncated or not an .npz"]),
    ("npz-truncated", ["mnist"], lambda d: truncate(mnist_npz(d)), [],
     ["mnist.npz is corrupt, truncated"]),
    ("npz-member-corrupt", ["mnist"], corrupt_npz_member, [],
     ["corrupt or truncated", "'x_train'"]),
    ("npz-missing-keys", ["mnist"], lambda d: mnist_npz(d, x_test=None, y_test=None), [],
     ["lacks key(s) x_test, y_test", "x_train, y_train, x_test, y_test"]),
    ("npz-float-images", ["mnist"],
     lambda d: mnist_npz(d, x_train=small_mnist()[0].astype(np.float32) / 255), [],
     ["x_train has dtype float32", "uint8"]),
    ("npz-float-labels", ["mnist"],
     lambda d: mnist_npz(d, y_test=small_mnist()[3].astype(np.float64)), [],
     ["y_test has dtype float64", "integer"]),
    ("npz-length-mismatch", ["mnist"],
     lambda d: mnist_npz(d, y_train=small_mnist()[1][:-1]), [],
     ["y_train holds 29 labels for 30 images", "same length"]),
    ("npz-label-too-large", ["mnist"],
     lambda d: mnist_npz(d, y_train=np.where(small_mnist()[1] == 9, 10, small_mnist()[1])),
     [], ["labels 0..10", "0..9"]),
    ("npz-negative-label", ["mnist"],
     lambda d: mnist_npz(d, y_test=small_mnist()[3] - 1), [], ["labels -1..8", "0..9"]),
    ("npz-no-images", ["mnist"],
     lambda d: mnist_npz(d, x_train=np.zeros((0, 28, 28), np.uint8),
                         y_train=np.zeros(0, np.int64)), [],
     ["x_train holds no images"]),
    ("npz-wrong-channels", ["mnist"],
     lambda d: mnist_npz(d, x_test=np.zeros((20, 28, 28, 3), np.uint8)), [],
     ["x_test has 3 channel(s)", "1"]),
    ("npz-wrong-size", ["cifar10"],
     lambda d: write_npz(d, "cifar10", x_train=np.zeros((30, 28, 28, 3), np.uint8),
                         y_train=small_cifar10()[1], x_test=small_cifar10()[2],
                         y_test=small_cifar10()[3]), [],
     ["28x28", "32x32"]),
    ("idx-truncated", ["mnist"],
     lambda d: truncate(write_mnist_idx(d, *small_mnist()) / "train-images-idx3-ubyte"), [],
     ["train-images-idx3-ubyte is truncated or corrupt", "--download"]),
    ("idx-bad-magic", ["mnist"],
     lambda d: (write_mnist_idx(d, *small_mnist()) / "t10k-labels-idx1-ubyte")
     .write_bytes(b"\x00\x00\x08\x03" + bytes(20)), [],
     ["is not an MNIST idx labels file", "2051", "2049"]),
    ("cifar-batch-truncated", ["cifar10"],
     lambda d: truncate(write_cifar10_batches(d, *small_cifar10()) / "data_batch_3"), [],
     ["data_batch_3 is corrupt or truncated", "--download"]),
    ("stl10-truncated", ["stl10"],
     lambda d: truncate(write_stl10_binary(d, *small_stl10()) / "unlabeled_X.bin"), [],
     ["unlabeled_X.bin is truncated or corrupt", "27,648"]),
    ("stl10-label-zero", ["stl10"], bad_stl_labels, [], ["train_y.bin holds labels 0..", "1..10"]),
    ("train-subset-too-large", ["mnist"], mnist_npz, ["--train-subset", "31"],
     ["--train-subset 31 exceeds the 30 train images"]),
    ("labels-per-class-too-large", ["mnist"], mnist_npz, ["--labels-per-class", "4"],
     ["--labels-per-class 4 exceeds the 3 train images of class"]),
    ("pretrain-subset-zero", ["mnist"], mnist_npz, ["--pretrain-subset", "0"],
     ["--pretrain-subset must be at least 1"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_data_error_from_the_cli(case, tmp_path, capsys):
    _, datasets, write, flags, words = case
    data_dir, out = tmp_path / "data", tmp_path / "out"
    if write:
        write(data_dir)
    code = main(["run", "--datasets", *datasets, "--data-dir", str(data_dir),
                 "--out", str(out), "--no-progress", *flags])
    captured = capsys.readouterr()
    assert code == 2
    err = captured.err.rstrip("\n")
    assert err.startswith("dinobench run: error: ") and "\n" not in err
    assert "Traceback" not in captured.err + captured.out
    for word in words:
        assert word in err, f"{word!r} missing from: {err}"
    assert not out.exists()  # nothing trained, nothing written


def test_failed_download_from_the_cli(tmp_path, capsys, monkeypatch):
    offline_torchvision(monkeypatch)
    out = tmp_path / "out"
    code = main(["run", "--datasets", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--download", "--out", str(out)])
    err = capsys.readouterr().err.rstrip("\n")
    assert code == 2 and "\n" not in err
    assert "downloading cifar10 with torchvision" in err and "name resolution" in err
    assert "cifar10.npz" in err
    assert not out.exists()


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinobench", "run", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("datasets", [["imagenet"], ["stl10"]])
def test_a_real_process_exits_2_with_one_line(datasets, tmp_path):
    out = tmp_path / "out"
    proc = _run_cli("--datasets", *datasets, "--out", str(out),
                    env={"DINOBENCH_DATA": str(tmp_path / "nowhere")})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dinobench run: error: ")
    if datasets == ["stl10"]:  # the data dir came from the environment variable
        assert str(tmp_path / "nowhere" / "stl10.npz") in proc.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not (REAL_DATA / "mnist.npz").is_file()
                    or not (REAL_DATA / "cifar10.npz").is_file(),
                    reason=f"real MNIST and CIFAR-10 copies not found in {REAL_DATA}")
def test_real_mnist_and_cifar10_run_end_to_end(tmp_path):
    """The acceptance command, with a tiny ViT so it takes seconds on a CPU."""
    out = tmp_path / "out"
    proc = _run_cli("--datasets", "mnist", "cifar10", "--data-dir", str(REAL_DATA),
                    "--train-subset", "200", "--epochs", "1", "--out", str(out),
                    "--no-progress", "--depth", "1", "--dim", "32", "--heads", "2",
                    "--mlp-dim", "64", "--out-dim", "64", "--batch-size", "50",
                    "--n-local", "2", "--label-budgets", "--test-subset", "1000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    for name in ("mnist", "cifar10"):
        mine = [r for r in rows if r["dataset"] == name and r["metric"] == "knn_top1"]
        assert {r["model"] for r in mine} == {"dino-small", "random-init", "pixels"}
        assert all(r["n_train"] == 200 and r["n_test"] == 1000 for r in mine)


@pytest.mark.slow
def test_stl10_runs_end_to_end_from_its_binary_layout(tmp_path):
    """The README's STL-10 command, ``--pretrain-subset`` included, on files in the
    layout the STL-10 archive unpacks to (``stl10_binary/*.bin``, column-major images,
    1-based labels), with a tiny ViT: pre-training draws its subset from the unlabelled
    split, the probes and k-NN bank from the labelled train split, the scores from the
    test split."""
    x_train, y_train, x_test, y_test, x_unlabeled = small_stl10()
    write_stl10_binary(tmp_path / "data", x_train, y_train, x_test, y_test, x_unlabeled)
    out = tmp_path / "out"
    proc = _run_cli("--datasets", "stl10", "--data-dir", str(tmp_path / "data"),
                    "--epochs", "1", "--out", str(out), "--no-progress", "--depth", "1",
                    "--dim", "32", "--heads", "2", "--mlp-dim", "64", "--out-dim", "64",
                    "--batch-size", "10", "--n-local", "2", "--label-budgets",
                    "--val-size", "10", "--pretrain-subset", str(len(x_unlabeled) - 4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    knn = [r for r in data["rows"] if r["metric"] == "knn_top1"]
    assert {r["model"] for r in knn} == {"dino-small", "random-init", "pixels"}
    assert all(r["dataset"] == "stl10" and r["n_test"] == len(x_test) for r in knn)
    assert data["meta"]["recipes"]["stl10"]["name"] == "small"
    log = proc.stderr + proc.stdout  # pre-training reads its subset of the unlabelled split
    assert f"[stl10] {len(x_unlabeled) - 4} pre-training images, {len(x_test)} test" in log
