"""A run folder: what one ``dinobench run`` writes, and the lock that keeps it to one run.

::

    <out>/results.json, results.csv, results.md, *.png   the tables and figures
    <out>/train_<dataset>_seed<seed>.jsonl              one log record per epoch
    <out>/checkpoints/<dataset>_seed<seed>.pt           the latest trainer state
    <out>/checkpoints/<dataset>_seed<seed>.done.json    rows of a finished (dataset, seed)
    <out>/.lock                                         held while a run writes here
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import UserError
from .io import atomic_write_json


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_file = None

    def checkpoint(self, dataset: str, seed: int) -> Path:
        return self.path / "checkpoints" / f"{dataset}_seed{seed}.pt"

    def done(self, dataset: str, seed: int) -> Path:
        return self.path / "checkpoints" / f"{dataset}_seed{seed}.done.json"

    def train_log(self, dataset: str, seed: int) -> Path:
        return self.path / f"train_{dataset}_seed{seed}.jsonl"

    def unfinished(self) -> list[Path]:
        """Checkpoints of (dataset, seed) units that have not finished."""
        ckpts = sorted((self.path / "checkpoints").glob("*.pt"))
        return [c for c in ckpts if not c.with_suffix(".done.json").exists()]

    # --- the lock --------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the folder and take its lock, or refuse if another run holds it.
        An OS lock (``flock``), so a crashed run never leaves a stale lock behind."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
        except OSError as e:
            raise UserError(f"cannot write to {self.path}: {e.strerror}; choose a writable "
                            "folder with --out") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"another dinobench run (pid {holder}) is writing to "
                            f"{self.path}; wait for it to finish or choose another "
                            "--out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        if not os.access(self.path, os.W_OK):
            self.release()
            raise UserError(f"{self.path} is not writable; choose another --out")

    def release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunFolder:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # --- finished units --------------------------------------------------------------
    def save_done(self, dataset: str, seed: int, payload: dict) -> None:
        atomic_write_json(self.done(dataset, seed), payload)

    def load_done(self, dataset: str, seed: int) -> dict | None:
        path = self.done(dataset, seed)
        if not path.exists():
            return None
        try:
            done = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is unreadable ({e}); delete it to redo that "
                            "dataset and seed") from None
        if not isinstance(done, dict) or not isinstance(done.get("rows"), list):
            raise UserError(f"{path} is not a finished unit's record (no rows); delete it "
                            "to redo that dataset and seed")
        return done

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by a run killed mid-write (the lock says none is live)."""
        for tmp in self.path.glob("**/.*.tmp"):
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget a previous run's progress (checkpoints and logs), keep the lock."""
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
        for log in self.path.glob("train_*.jsonl"):
            log.unlink(missing_ok=True)
