"""Figures (PNG, matplotlib, no display needed). Each takes plain arrays, so ``report``
can redraw them from ``results.json`` alone."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


def uint8_images(images) -> np.ndarray:
    """``(N, H, W, C)`` uint8 from nested lists or from ``{"shape", "uint8_base64"}``
    (the compact form ``experiments.pack_uint8`` writes into results.json)."""
    if isinstance(images, dict):
        raw = base64.b64decode(images["uint8_base64"])
        return np.frombuffer(raw, dtype=np.uint8).reshape(images["shape"])
    return np.asarray(images, dtype=np.uint8)


def _attention_panels(images, maps: np.ndarray):
    """Inputs, heat maps and overlays as ``float (N, H, W, 3)`` arrays in [0, 1]."""
    images = uint8_images(images).astype(np.float32) / 255.0
    maps = np.asarray(maps, dtype=np.float32)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    up = _upsample(maps, images.shape[1])
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    norm = (up - lo) / np.maximum(hi - lo, 1e-12)  # per image, for display only
    heat = plt.get_cmap("inferno")(norm)[..., :3].astype(np.float32)
    return images, heat, 0.45 * images + 0.55 * heat


def attention_figure(images: np.ndarray, maps: np.ndarray, path: str | Path,
                     title: str = "") -> None:
    """The seed's Fig. 2 layout: (a) inputs, (b) attention maps, (c) maps over inputs.

    ``images``: ``uint8 (N, H, W, C)``; ``maps``: ``(N, gh, gw)`` CLS-to-patch attention of
    the last block (mean over heads), each summing to 1.
    """
    images, heat, overlay = _attention_panels(images, maps)
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


def attention_grid_figure(images, maps: dict[str, list], path: str | Path, title: str = "",
                          foreground=None) -> None:
    """One row per model in the seed's layout (input / map / overlay, 4x4 mosaics).
    ``foreground`` ``(N, gh, gw)`` 0/1, when given, is outlined in cyan on the overlays
    (patch level: what the overlap scores compare with)."""
    names = list(maps)
    fig, axes = plt.subplots(len(names), 3, figsize=(12, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        tiles = _attention_panels(images, maps[name])
        cols = math.ceil(math.sqrt(len(tiles[0])))
        for ax, t, label in zip(row, tiles, ("input", "attention map", "overlay")):
            ax.imshow(_mosaic(t, cols), interpolation="nearest")
            ax.set_title(f"{name}: {label}")
            ax.axis("off")
        if foreground is not None:
            fg = _upsample(np.asarray(foreground, dtype=np.float32), tiles[0].shape[1])
            row[2].contour(_mosaic(fg, cols, fill=0.0), levels=[0.5], colors="cyan",
                           linewidths=0.6)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def learning_curves_figure(curves: list[dict], path: str | Path, title: str = "") -> None:
    """The seed's Figs. 5 and 6: one row per run, loss on the left and accuracy (train
    and test, or validation for DINO's curves, %) on the right, against the epoch.
    Missing points (None) are skipped."""
    fig, axes = plt.subplots(len(curves), 2, figsize=(11, 3.2 * len(curves)), squeeze=False)
    for (ax_loss, ax_acc), c in zip(axes, curves):
        ax_loss.plot(c["epoch"], c["loss"], color="C0")
        ax_loss.set_ylabel(c.get("loss_name", "loss"))
        ax_loss.set_title(c.get("label", c.get("model", "")))
        for key, label, colour in (("train_top1", "train", "C1"), ("test_top1", "test", "C2"),
                                   ("probe_top1", "linear probe (test)", "C3"),
                                   ("val_top1", "k-NN (validation)", "C2"),
                                   ("val_probe_top1", "linear probe (validation)", "C3")):
            pts = [(e, v) for e, v in zip(c["epoch"], c.get(key) or []) if v is not None]
            if pts:
                ax_acc.plot(*zip(*pts), marker=".", color=colour, label=label)
        ax_acc.set_ylabel("top-1 (%)")
        ax_acc.set_ylim(0, 100)
        if ax_acc.get_legend_handles_labels()[0]:
            ax_acc.legend(fontsize=8)
        for ax in (ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def bars_figure(groups: list[str], series: dict[str, tuple[list, list]], path: str | Path,
                title: str = "", ylabel: str = "%", reference: str | None = None) -> None:
    """Grouped bars: ``series`` maps a model to (means, stds), one value per group. The
    ``reference`` series (chance) is also drawn as a dashed line across its group."""
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(groups)), 4))
    for i, (name, (means, stds)) in enumerate(series.items()):
        m = np.array([np.nan if v is None else v for v in means], dtype=float)
        e = np.array([0.0 if v is None else v for v in stds], dtype=float)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, m, width, yerr=e, capsize=2, label=name,
               hatch="//" if name == reference else None, alpha=0.85)
        if name == reference:
            for xi, mi in zip(x, m):
                ax.hlines(mi, xi - 0.4, xi + 0.4, colors="k", linestyles="dashed", lw=0.8)
    ax.set_xticks(x, [g.replace("_", " ").replace(" head", "\nhead") for g in groups])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    _save(fig, path)


def lines_figure(panels: dict[str, dict[str, dict[str, tuple[list, list]]]],
                 path: str | Path, title: str = "", xlabel: str = "", ylabel: str = "%",
                 logx: bool = False) -> None:
    """A grid of line plots: ``panels[row][column]`` maps a line label to (x, y). Chance
    references are styled apart: random-init dotted, uniform dashed grey."""
    n_rows, n_cols = len(panels), max(len(cols) for cols in panels.values())
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.4 * n_cols, 3.3 * n_rows),
                             squeeze=False)
    for ax_row, (row_name, cols) in zip(axes, panels.items()):
        for ax, (col_name, lines) in zip(ax_row, cols.items()):
            for label, (xs, ys) in lines.items():
                style = {"linestyle": ":"} if "random" in label else \
                    {"linestyle": "--", "color": "grey"} if "uniform" in label else {}
                ax.plot(xs, ys, marker="o", label=label, **style)
            if logx:
                ax.set_xscale("log")
            else:
                ax.set_xticks(sorted({x for xs, _ in lines.values() for x in xs}))
            ax.set_title(" / ".join(t for t in (row_name, col_name) if t))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in ax_row[len(cols):]:
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def knn_time_figure(curves: list[dict], path: str | Path, references: dict | None = None,
                    title: str = "") -> None:
    """Validation k-NN (%) against seconds of training, one panel per dataset and one
    line per curve (model and seed). Each curve holds ``train_seconds`` and ``val_top1``
    (None where an epoch was not evaluated) and may hold ``levels``, the dataset's
    time-to-accuracy levels, drawn as dotted lines. ``references[dataset][model]``: final
    validation k-NN of references (raw pixels, at the model's input size too where it
    reads them shrunk, random init), drawn dashed."""
    references = references or {}
    datasets = list(dict.fromkeys(c["dataset"] for c in curves))
    cols = min(len(datasets), 3)
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        mine = [c for c in curves if c["dataset"] == dataset]
        for c in mine:
            pts = [(t, v) for t, v in zip(c["train_seconds"], c["val_top1"])
                   if t is not None and v is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{c['model']}, seed {c['seed']}")
        for level in dict.fromkeys(lv for c in mine for lv in c.get("levels") or []):
            ax.axhline(level, color="grey", linestyle=":", linewidth=0.7)
        for i, (model, value) in enumerate((references.get(dataset) or {}).items()):
            ax.axhline(value, color=f"C{7 + i}", linestyle="--", linewidth=1.0,
                       label=f"{model} (reference)")
        ax.set_title(dataset)
        ax.set_xlabel("training time (s, evaluations excluded)")
        ax.set_ylabel("validation k-NN top-1 (%)")
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
