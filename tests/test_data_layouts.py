"""Every on-disk layout, written small into a temporary folder and read back through
``load_dataset`` (the path the CLI takes), with no network.

The torchvision layouts are also read by torchvision itself (its MD5 checks bypassed, as
the files are synthetic), so the test pins our reading to torchvision's interpretation
of the format, not only to our own writer.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from dinobench.data import SPECS, load_dataset
from dinobench.errors import DataError

# -- writers of each layout ------------------------------------------------------------


def make_split(n_per_class: int, side: int, channels: int | None, seed: int,
               classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images ``(N, side, side[, channels])`` and shuffled labels."""
    rng = np.random.default_rng(seed)
    shape = (n_per_class * classes, side, side) + ((channels,) if channels else ())
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = rng.permutation(np.repeat(np.arange(classes), n_per_class)).astype(np.int64)
    return x, y


def write_mnist_idx(data_dir: Path, x_train, y_train, x_test, y_test) -> Path:
    """``<data_dir>/MNIST/raw/*-ubyte``: big-endian idx headers, then raw uint8."""
    folder = data_dir / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, *x.shape) + x.astype(np.uint8).tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes())
    return folder


class _Python2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` (the BINSTRING opcodes), as the official
    CIFAR-10 batches were written: their keys load as ``"data"`` with
    ``encoding="latin1"`` (torchvision) and as ``b"data"`` with ``encoding="bytes"``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def write_cifar10_batches(data_dir: Path, x_train, y_train, x_test, y_test) -> Path:
    """``<data_dir>/cifar-10-batches-py``: five pickled train batches and a test batch,
    each ``{b"data": uint8 (N, 3072) as R, G, B planes, b"labels": [int]}``."""
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, entry):
        with open(folder / name, "wb") as f:
            _Python2Pickler(f, protocol=2).dump(entry)

    def batch(name, x, y):
        dump(name, {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                    b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1),
                    b"filenames": [f"{i}.png".encode() for i in range(len(x))]})

    for i, (xb, yb) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5))):
        batch(f"data_batch_{i + 1}", xb, yb)
    batch("test_batch", x_test, y_test)
    dump("batches.meta", {b"label_names": [c.encode() for c in SPECS["cifar10"].classes]})
    return folder


def stl10_bytes(x: np.ndarray) -> bytes:
    """``(N, H, W, C)`` images as STL-10 stores them: each image column-major (MATLAB),
    i.e. ``(N, C, W, H)`` in row-major order."""
    return np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes()


def write_stl10_binary(data_dir: Path, x_train, y_train, x_test, y_test, x_unlabeled
                       ) -> Path:
    """``<data_dir>/stl10_binary``: raw image files and 1-based one-byte labels."""
    folder = data_dir / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        (folder / f"{split}_X.bin").write_bytes(stl10_bytes(x))
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(stl10_bytes(x_unlabeled))
    (folder / "class_names.txt").write_text("\n".join(SPECS["stl10"].classes) + "\n")
    (folder / "fold_indices.txt").write_text(" ".join(map(str, range(len(x_train)))) + "\n")
    return folder


def write_npz(data_dir: Path, name: str, **arrays) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def small_mnist(seed: int = 0):
    return (*make_split(3, 28, None, seed), *make_split(2, 28, None, seed + 1))


def small_cifar10(seed: int = 0):
    return (*make_split(3, 32, 3, seed), *make_split(2, 32, 3, seed + 1))


def small_stl10(seed: int = 0):
    x_unlabeled = make_split(2, 96, 3, seed + 2)[0]
    return (*make_split(2, 96, 3, seed), *make_split(1, 96, 3, seed + 1), x_unlabeled)


def as_nchw(x: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


def padded(x: np.ndarray, size: int) -> torch.Tensor:
    """What zero-padding to ``size`` must give, built independently of the loader."""
    t = as_nchw(x)
    p = (size - t.shape[-1]) // 2
    return torch.nn.functional.pad(t, (p, p, p, p))


# -- torchvision layouts ---------------------------------------------------------------


def test_mnist_idx_layout_matches_torchvision(tmp_path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_mnist_idx(tmp_path, x_train, y_train, x_test, y_test)
    ds = load_dataset("mnist", data_dir=tmp_path)
    reference = tvd.MNIST(str(tmp_path), train=True, download=False)  # no MD5 on raw files
    assert torch.equal(ds.train_images[:, 0, 2:30, 2:30], reference.data)
    assert torch.equal(ds.train_labels, reference.targets)
    assert ds.train_images.shape == (30, 1, 32, 32) and ds.train_images.dtype == torch.uint8
    assert torch.equal(ds.train_images, padded(x_train, 32))  # border is zero, not resized
    assert torch.equal(ds.test_images, padded(x_test, 32))
    assert torch.equal(ds.test_labels, torch.from_numpy(y_test))
    assert ds.pretrain_images is ds.train_images  # no unlabelled split: train images
    assert "MNIST" in ds.source


def test_cifar10_batches_layout_matches_torchvision(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = small_cifar10()
    write_cifar10_batches(tmp_path, x_train, y_train, x_test, y_test)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    for train, images, labels in ((True, ds.train_images, ds.train_labels),
                                  (False, ds.test_images, ds.test_labels)):
        reference = tvd.CIFAR10(str(tmp_path), train=train, download=False)
        assert torch.equal(images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert labels.tolist() == reference.targets
    assert torch.equal(ds.train_images, as_nchw(x_train))
    assert torch.equal(ds.train_labels, torch.from_numpy(y_train))
    assert ds.train_images.is_contiguous()


def test_stl10_binary_layout_matches_torchvision(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test, x_unlabeled = small_stl10()
    write_stl10_binary(tmp_path, x_train, y_train, x_test, y_test, x_unlabeled)
    ds = load_dataset("stl10", data_dir=tmp_path)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)
    for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                  ("test", ds.test_images, ds.test_labels),
                                  ("unlabeled", ds.pretrain_images, None)):
        reference = tvd.STL10(str(tmp_path), split=split, download=False)
        assert torch.equal(images, torch.from_numpy(np.ascontiguousarray(reference.data)))
        if labels is not None:
            assert torch.equal(labels, torch.from_numpy(reference.labels.astype(np.int64)))
    # The seed's split roles: unlabelled images pre-train, labelled train and test evaluate.
    assert torch.equal(ds.pretrain_images, as_nchw(x_unlabeled))
    assert torch.equal(ds.train_images, as_nchw(x_train))
    assert torch.equal(ds.test_labels, torch.from_numpy(y_test))
    assert ds.train_images.shape[1:] == (3, 96, 96)


def test_stl10_pretrain_subset_draws_from_the_unlabelled_split(tmp_path):
    x_train, y_train, x_test, y_test, x_unlabeled = small_stl10()
    write_stl10_binary(tmp_path, x_train, y_train, x_test, y_test, x_unlabeled)
    ds = load_dataset("stl10", data_dir=tmp_path, pretrain_subset=7, seed=3)
    assert ds.pretrain_images.shape == (7, 3, 96, 96)
    pool = as_nchw(x_unlabeled).flatten(1)
    rows = [int(torch.nonzero((pool == img.flatten()).all(1))[0]) for img in ds.pretrain_images]
    assert len(set(rows)) == 7
    again = load_dataset("stl10", data_dir=tmp_path, pretrain_subset=7, seed=3)
    assert torch.equal(again.pretrain_images, ds.pretrain_images)
    assert torch.equal(ds.train_images, as_nchw(x_train))  # labelled split untouched


# -- the Keras .npz layout -------------------------------------------------------------


def test_npz_mnist_is_padded_not_resized(tmp_path):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(tmp_path, "mnist", x_train=x_train, y_train=y_train, x_test=x_test,
              y_test=y_test)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert torch.equal(ds.train_images, padded(x_train, 32))
    assert torch.equal(ds.test_images, padded(x_test, 32))
    assert ds.train_labels.dtype == torch.int64
    assert ds.source == str(tmp_path / "mnist.npz")


def test_npz_cifar10_keras_shapes(tmp_path):
    """Keras gives CIFAR labels as uint8 (N, 1) and images channels-last."""
    x_train, y_train, x_test, y_test = small_cifar10()
    write_npz(tmp_path, "cifar10", x_train=x_train, y_train=y_train[:, None].astype(np.uint8),
              x_test=x_test, y_test=y_test[:, None].astype(np.uint8))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert torch.equal(ds.train_images, as_nchw(x_train))
    assert torch.equal(ds.train_labels, torch.from_numpy(y_train))
    assert torch.equal(ds.test_images, as_nchw(x_test))


def test_npz_stl10_with_unlabelled_images(tmp_path):
    x_train, y_train, x_test, y_test, x_unlabeled = small_stl10()
    write_npz(tmp_path, "stl10", x_train=x_train, y_train=y_train, x_test=x_test,
              y_test=y_test, x_unlabeled=x_unlabeled)
    ds = load_dataset("stl10", data_dir=tmp_path)
    assert torch.equal(ds.pretrain_images, as_nchw(x_unlabeled))
    assert torch.equal(ds.train_images, as_nchw(x_train))


def test_npz_comes_before_the_torchvision_folder(tmp_path):
    write_mnist_idx(tmp_path, *small_mnist(seed=0))
    x_train, y_train, x_test, y_test = small_mnist(seed=10)
    write_npz(tmp_path, "mnist", x_train=x_train, y_train=y_train, x_test=x_test,
              y_test=y_test)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.source.endswith("mnist.npz")
    assert torch.equal(ds.train_images, padded(x_train, 32))


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = small_mnist()
    write_npz(tmp_path / "env", "mnist", x_train=x_train, y_train=y_train, x_test=x_test,
              y_test=y_test)
    monkeypatch.setenv("DINOBENCH_DATA", str(tmp_path / "env"))
    assert load_dataset("mnist").source == str(tmp_path / "env" / "mnist.npz")


def test_default_data_dir_is_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DINOBENCH_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"\.cache/dinobench"):
        load_dataset("cifar10")


# -- downloading goes through torchvision, only when asked ------------------------------


class _FakeMNIST:
    """Stands in for torchvision.datasets.MNIST: 'downloads' by writing the raw files."""

    calls: list[dict] = []

    def __init__(self, root, train=True, download=False, **kwargs):
        type(self).calls.append({"root": root, "download": download})
        if download:
            write_mnist_idx(Path(root), *small_mnist(seed=5))


def test_download_fetches_through_torchvision_then_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd, "MNIST", _FakeMNIST)
    _FakeMNIST.calls = []
    ds = load_dataset("mnist", data_dir=tmp_path / "new", download=True)
    assert _FakeMNIST.calls == [{"root": str(tmp_path / "new"), "download": True}]
    assert torch.equal(ds.train_images, padded(small_mnist(seed=5)[0], 32))
    load_dataset("mnist", data_dir=tmp_path / "new", download=True)  # present: no fetch
    assert len(_FakeMNIST.calls) == 1


def test_no_download_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(tvd, "MNIST", _FakeMNIST)
    _FakeMNIST.calls = []
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", data_dir=tmp_path)
    assert _FakeMNIST.calls == []


def test_a_failed_download_is_a_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried "
                           "https://example.invalid/, got:\n<urlopen error [Errno -3]>")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError, match="downloading mnist with torchvision") as info:
        load_dataset("mnist", data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value) and "mnist.npz" in str(info.value)
