"""The oldest torch this package relies on, checked at import with a clear message.

Kept in step with ``dependencies`` in pyproject.toml. torch 2.3 is the first release with
everything used here: ``F.scaled_dot_product_attention`` with its fused CPU kernels,
``torch._foreach_lerp_`` with a scalar weight, ``torch.load(weights_only=True)`` for
checkpoints, fused AdamW on CUDA and ``torch.autocast`` with bf16 on CUDA.
"""

from __future__ import annotations

import re

MIN_TORCH = (2, 3)


def parse_version(text: str) -> tuple[int, int]:
    """``"2.14.1+cu130"`` -> ``(2, 14)``."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if not m:
        raise ValueError(f"cannot read a version from {text!r}")
    return int(m.group(1)), int(m.group(2))


def check_torch(version: str) -> None:
    if parse_version(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"dinobench needs torch >= {need}, found {version}; upgrade with "
                          f"pip install 'torch>={need}'")
