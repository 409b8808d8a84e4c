"""Figures (PNG, matplotlib, no display needed). Each takes plain arrays, so ``report``
can redraw them from ``results.json`` alone."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402


def _mosaic(tiles: np.ndarray, cols: int, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """``(N, H, W[, C])`` -> one image of the tiles in a grid ``cols`` wide."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    shape = (rows * (h + pad) - pad, cols * (w + pad) - pad) + tiles.shape[3:]
    out = np.full(shape, fill, dtype=np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = t
    return out


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """``(N, gh, gw)`` patch maps -> ``(N, size, size)`` by repeating each patch (what the
    model saw: one weight per patch)."""
    f = size // maps.shape[-1]
    return maps.repeat(f, axis=1).repeat(f, axis=2)


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight",
                metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def attention_figure(images: np.ndarray, maps: np.ndarray, path: str | Path,
                     title: str = "") -> None:
    """The seed's Fig. 2 layout: (a) inputs, (b) attention maps, (c) maps over inputs.

    ``images``: ``uint8 (N, H, W, C)``; ``maps``: ``(N, gh, gw)`` CLS-to-patch attention of
    the last block (mean over heads), each summing to 1.
    """
    images = np.asarray(images, dtype=np.float32) / 255.0
    maps = np.asarray(maps, dtype=np.float32)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    size = images.shape[1]
    up = _upsample(maps, size)
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    norm = (up - lo) / np.maximum(hi - lo, 1e-12)  # per image, for display only
    heat = plt.get_cmap("inferno")(norm)[..., :3].astype(np.float32)
    overlay = 0.45 * images + 0.55 * heat
    cols = math.ceil(math.sqrt(len(images)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, tiles, label in zip(axes, (images, heat, overlay),
                                ("(a) input", "(b) attention map", "(c) overlay")):
        ax.imshow(_mosaic(tiles, cols), interpolation="nearest")
        ax.set_title(label)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, path)
