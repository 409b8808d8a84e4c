"""Where a dataset's files are looked for, in order, and what happens when none are there.

1. ``<data-dir>/<name>.npz`` in the Keras layout (see :mod:`.npz`);
2. torchvision's folder for the dataset under ``<data-dir>`` (see
   :mod:`.torchvision_layout`), downloaded by torchvision first only with ``download``;
3. otherwise a :class:`DataError` that says where it looked and the two ways out.

The data dir is ``--data-dir`` when given, else ``$DINOBENCH_DATA``, else
``~/.cache/dinobench``. The scikit-learn digits are bundled and need none of this.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .npz import KEYS as NPZ_KEYS
from .npz import read_npz
from .registry import DatasetSpec
from .splits import RawSplits
from .torchvision_layout import LAYOUTS

DATA_DIR_ENV = "DINOBENCH_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/dinobench")


def default_data_dir() -> Path:
    """``$DINOBENCH_DATA`` if set, else ``~/.cache/dinobench``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def read_files(spec: DatasetSpec, data_dir: Path, download: bool = False) -> RawSplits:
    """The dataset's splits from the first source present under ``data_dir``."""
    npz_path = data_dir / f"{spec.name}.npz"
    if npz_path.is_file():
        return read_npz(npz_path, spec)
    layout = LAYOUTS[spec.name]
    missing = layout.missing(data_dir)
    if missing and download:
        layout.download(data_dir, spec)
        missing = layout.missing(data_dir)
        if missing:
            raise DataError(f"torchvision's download of {spec.name} left {missing[0]} "
                            f"missing; delete {data_dir / layout.folder} and run again")
    if not missing:
        return layout.load(data_dir, spec)
    folder = data_dir / layout.folder
    found = "does not exist" if not data_dir.is_dir() else (
        f"has no {missing[0].name}" if folder.is_dir() else "has neither")
    raise DataError(
        f"{spec.name} not found: looked for {npz_path} and torchvision's {folder}/ "
        f"({data_dir} {found}). Either run with --download on a machine with internet "
        f"(torchvision fetches it into {data_dir}), or put {spec.name}.npz ({NPZ_KEYS}) "
        f"in --data-dir (default: ${DATA_DIR_ENV}, else {DEFAULT_DATA_DIR})")
