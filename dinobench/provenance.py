"""Where and with what a run was made, recorded in its metadata and rows: the device, the
package's commit, and the switch to deterministic kernels."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def machine() -> str:
    """The host a run was made on, for its metadata: CPU architecture and cores, and the
    accelerator when there is one, so a wall time can be read against its hardware."""
    host = f"{platform.machine()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        host += f", {torch.cuda.get_device_name()}"
    return host


def git_commit() -> str | None:
    """The package's commit, with ``+dirty`` when its files differ from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=here).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5, cwd=here).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    torch.use_deterministic_algorithms(True)
