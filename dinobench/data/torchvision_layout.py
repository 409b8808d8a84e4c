"""torchvision's on-disk layouts of MNIST, CIFAR-10 and STL-10, read directly.

The files are the ones ``torchvision.datasets.{MNIST, CIFAR10, STL10}(root=data_dir,
download=True)`` leaves behind (the usual root layout)::

    <data-dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    <data-dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}
    <data-dir>/stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin

torchvision downloads them (only with ``--download``); reading is done here, whole
arrays at a time, because torchvision's readers check every file against the official
MD5 sums (hashing STL-10's 2.6 GB unlabelled file on each load) and some of them report
a damaged file through a bare ``assert``. Every problem becomes a :class:`DataError`
that names the file.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .npz import KEYS as NPZ_KEYS
from .npz import one_line
from .registry import DatasetSpec
from .splits import RawSplits, check_images, check_labels

REDOWNLOAD = "delete it and run again with --download to fetch a fresh copy"


# MNIST: the idx format. A big-endian header: magic number (0x0803 = uint8, 3 dims for
# images: 2051; 0x0801 = uint8, 1 dim for labels: 2049), then one uint32 per dimension.
IDX_MAGIC = {"images": 2051, "labels": 2049}


def read_idx(path: Path, kind: str) -> np.ndarray:
    """An idx file of ``kind`` 'images' ``(N, H, W)`` or 'labels' ``(N,)``, uint8."""
    expected = IDX_MAGIC[kind]
    size = path.stat().st_size
    head = np.fromfile(path, dtype=">u4", count=1)
    magic = int(head[0]) if len(head) else None
    if magic != expected:
        found = "no header" if magic is None else f"magic number {magic}"
        raise DataError(f"{path} is not an MNIST idx {kind} file ({found}, expected magic "
                        f"number {expected}); {REDOWNLOAD}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = np.fromfile(path, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    announced = int(np.prod(dims)) if len(dims) == ndim else -1
    if size - header != announced:
        raise DataError(f"{path} is truncated or corrupt: its header announces "
                        f"{tuple(dims.tolist())} but {max(size - header, 0):,} bytes of "
                        f"data follow; {REDOWNLOAD}")
    return np.fromfile(path, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist(folder: Path, spec: DatasetSpec) -> RawSplits:
    splits = []
    for prefix in ("train", "t10k"):
        x_path = folder / f"{prefix}-images-idx3-ubyte"
        y_path = folder / f"{prefix}-labels-idx1-ubyte"
        x = check_images(read_idx(x_path, "images"), spec, str(x_path))
        splits += [x, check_labels(read_idx(y_path, "labels"), len(x), spec, str(y_path))]
    return RawSplits(*splits, origin=str(folder))


# CIFAR-10: pickled dicts {b"data": uint8 (N, 3072) rows of R, G, B planes of 32x32,
# b"labels": list of N ints}. Unpickling runs code named in the file, so only the
# numpy array constructors those files use are allowed.
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        modern = module.replace("numpy.core", "numpy._core", 1)  # numpy 2 renamed it
        if (modern, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        try:
            return super().find_class(modern, name)
        except ModuleNotFoundError:  # numpy < 2
            return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images ``(N, 3, 32, 32)`` and labels as stored."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same
        raise DataError(f"{path} is corrupt or truncated ({one_line(e)}); "
                        f"{REDOWNLOAD}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (it holds a "
                        f"{type(entry).__name__}, not a dict); {REDOWNLOAD}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    missing = [k for k in ("data", "labels") if k not in entry]
    if missing:
        raise DataError(f"{path} is not a CIFAR-10 batch: key(s) {', '.join(missing)} "
                        f"missing; {REDOWNLOAD}")
    data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} holds data {data.dtype} {data.shape}, expected uint8 "
                        f"(N, 3072); {REDOWNLOAD}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(folder: Path, spec: DatasetSpec) -> RawSplits:
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_cifar_batch(folder / n) for n in names]
        where = str(folder / names[0]) if len(names) == 1 else f"{folder}/data_batch_[1-5]"
        x = check_images(np.concatenate([p[0] for p in parts]), spec, where,
                         channels_last=False)
        return x, check_labels(np.concatenate([p[1] for p in parts]), len(x), spec, where)

    return RawSplits(*read(CIFAR10_TRAIN), *read(["test_batch"]), origin=str(folder))


# STL-10: raw uint8 images, 96x96x3 each, every image written column-major as MATLAB
# stores it; labels are one byte each, 1..10. The unlabelled file is 2.6 GB, so it is
# memory-mapped: only the rows a run uses are ever read.
STL10_IMAGE_BYTES = 3 * 96 * 96


def read_stl10_images(path: Path) -> np.ndarray:
    """``(N, 3, 96, 96)`` as a lazy view of the file (no copy)."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty: it holds no images; {REDOWNLOAD}")
    if size % STL10_IMAGE_BYTES:
        raise DataError(f"{path} is truncated or corrupt: {size:,} bytes is not a whole "
                        f"number of 96x96x3 images ({STL10_IMAGE_BYTES:,} bytes each); "
                        f"{REDOWNLOAD}")
    x = np.memmap(path, dtype=np.uint8, mode="r",
                  shape=(size // STL10_IMAGE_BYTES, 3, 96, 96))
    return x.transpose(0, 1, 3, 2)  # column-major: (N, C, W, H) -> (N, C, H, W)


def read_stl10_labels(path: Path) -> np.ndarray:
    y = np.fromfile(path, dtype=np.uint8)
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path} holds labels {y.min()}..{y.max()}, but STL-10 label files "
                        f"number the classes 1..10; {REDOWNLOAD}")
    return y.astype(np.int64) - 1


def read_stl10(folder: Path, spec: DatasetSpec) -> RawSplits:
    splits = []
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        x = check_images(read_stl10_images(x_path), spec, str(x_path), channels_last=False)
        splits += [x, check_labels(read_stl10_labels(y_path), len(x), spec, str(y_path))]
    unlabeled_path = folder / "unlabeled_X.bin"
    unlabeled = check_images(read_stl10_images(unlabeled_path), spec, str(unlabeled_path),
                             channels_last=False)
    return RawSplits(*splits, unlabeled, origin=str(folder))


@dataclass(frozen=True)
class Layout:
    """Where torchvision keeps one dataset, how to read it and how to download it."""

    folder: str  # relative to the data dir
    files: tuple[str, ...]  # all must exist for the layout to be read
    read: Callable[[Path, DatasetSpec], RawSplits]
    torchvision_class: str
    torchvision_kwargs: dict = field(default_factory=dict)  # a small split to load after

    def missing(self, data_dir: Path) -> list[Path]:
        return [p for p in (data_dir / self.folder / f for f in self.files) if not p.is_file()]

    def load(self, data_dir: Path, spec: DatasetSpec) -> RawSplits:
        return self.read(data_dir / self.folder, spec)

    def download(self, data_dir: Path, spec: DatasetSpec) -> None:
        """Let torchvision fetch and verify the files (MD5) into ``data_dir``."""
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.torchvision_class)
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            cls(str(data_dir), download=True, **self.torchvision_kwargs)
        except Exception as e:  # network, disk and checksum failures alike
            raise DataError(f"downloading {spec.name} with torchvision into {data_dir} "
                            f"failed ({one_line(e)}); check the internet connection, or "
                            f"put {spec.name}.npz ({NPZ_KEYS}) in --data-dir") from None


LAYOUTS: dict[str, Layout] = {
    "mnist": Layout("MNIST/raw", tuple(f"{p}-{k}-ubyte" for p in ("train", "t10k")
                                       for k in ("images-idx3", "labels-idx1")),
                    read_mnist, "MNIST", {"train": False}),
    "cifar10": Layout("cifar-10-batches-py", (*CIFAR10_TRAIN, "test_batch"), read_cifar10,
                      "CIFAR10", {"train": False}),
    "stl10": Layout("stl10_binary", ("train_X.bin", "train_y.bin", "test_X.bin",
                                     "test_y.bin", "unlabeled_X.bin"),
                    read_stl10, "STL10", {"split": "test"}),
}
