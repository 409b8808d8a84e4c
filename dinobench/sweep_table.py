"""The table and figure of a recipe study, from each run's rows and training log.

Per (dataset, variant), over seeds: the final validation k-NN of the DINO teacher (median,
min and max), the training seconds to reach each k-NN level (median; a seed that never
reached a level counts as infinitely slow, so the median reads "not reached" once half
the seeds miss it, and the misses are counted), how many seeds collapsed and why,
images/s and training seconds. Variants are sorted by median final k-NN, best first.

Beside each variant, the same k-NN of a random-init ViT of its shape (the chance
reference: it moves when the variant changes the architecture), and above each table the
raw-pixel reference, with the pixels at the model's input size (``pixels-<size>px``)
where the variants read their images shrunk.

Everything is read from what a run writes: ``results.json`` rows (``val_knn_top1``,
``time_to_knn``, ``train_seconds``, ``images_per_s``, ``collapsed``) where present, else
the per-epoch records of the train log (``train_seconds``, ``val_knn_top1``,
``images_seen``; from older runs ``seconds`` and the test-split ``knn_top1``, with the
split named in the table).
"""

from __future__ import annotations

import csv
import io
import math
import statistics

from .config import is_resized_pixels


def _dino(rows: list[dict]) -> list[dict]:
    return [r for r in rows if str(r.get("model", "")).startswith("dino-")]


def curve(history: list[dict]) -> tuple[list[float], list[float], str]:
    """Evaluated epochs of a train log as (training seconds, k-NN %, split). Seconds are
    the records' cumulative ``train_seconds``, else the running sum of epoch ``seconds``
    (both exclude evaluation)."""
    key, split = ("val_knn_top1", "validation") if any(
        h.get("val_knn_top1") is not None for h in history) else ("knn_top1", "test")
    xs, ys, total = [], [], 0.0
    for h in history:
        total += float(h.get("seconds") or 0.0)
        if h.get(key) is not None:
            xs.append(float(h.get("train_seconds", total)))
            ys.append(float(h[key]))
    return xs, ys, split


def train_seconds(history: list[dict]) -> float | None:
    if not history:
        return None
    last = history[-1]
    if last.get("train_seconds") is not None:
        return float(last["train_seconds"])
    return sum(float(h.get("seconds") or 0.0) for h in history)


def images_per_s(history: list[dict]) -> float | None:
    """Training throughput over the whole run: images seen / training seconds, or the
    epochs' rates weighted by their seconds (the same ratio from older logs)."""
    if not history:
        return None
    last = history[-1]
    if last.get("images_seen") is not None and last.get("train_seconds"):
        return float(last["images_seen"]) / float(last["train_seconds"])
    timed = [(float(h["images_per_s"]), float(h["seconds"])) for h in history
             if h.get("images_per_s") is not None and h.get("seconds")]
    total = sum(s for _, s in timed)
    return sum(r * s for r, s in timed) / total if total else None


def time_to(xs: list[float], ys: list[float], level: float) -> float | None:
    """Training seconds at the first evaluation with k-NN >= ``level``; None if never."""
    return next((x for x, y in zip(xs, ys) if y >= level), None)


def _final_knn(by_metric: dict, ys: list[float], split: str) -> tuple[float | None, str]:
    """A model's final k-NN: its validation row, else the log's last validation point,
    else its test row."""
    if "val_knn_top1" in by_metric:
        return by_metric["val_knn_top1"]["value"], "validation"
    if ys and split == "validation":
        return ys[-1], split
    if "knn_top1" in by_metric:
        return by_metric["knn_top1"]["value"], "test"
    return (ys[-1] if ys else None), split


def unit_summary(rows: list[dict], history: list[dict], levels) -> dict:
    """One (dataset, seed) of a variant: its rows (that dataset's) and train log."""
    xs, ys, split = curve(history)
    dino = _dino(rows)
    by_metric = {r["metric"]: r for r in dino}
    knn, split = _final_knn(by_metric, ys, split)
    references = {}
    # Beside random init and the stored pixels, the pixels at the model's input size where
    # it reads the images shrunk, under their own name (``pixels-16px``), so that
    # variants of different input sizes never share a reference.
    models = ["random-init", "pixels"] + sorted({
        str(r["model"]) for r in rows if is_resized_pixels(str(r.get("model", "")))})
    for model in models:
        mine = {r["metric"]: r for r in rows if r.get("model") == model}
        # The same split as the DINO score, or none: a test score beside a validation
        # one would not be a reference.
        metric = "val_knn_top1" if split == "validation" else "knn_top1"
        if metric in mine and mine[metric]["value"] is not None:
            references[model] = float(mine[metric]["value"])
    times = {}
    for level in levels:
        row = next((r for r in dino if r["metric"] == "time_to_knn"
                    and r.get("threshold") is not None
                    and math.isclose(float(r["threshold"]), level)), None)
        times[level] = row["value"] if row is not None else time_to(xs, ys, level)
    reasons = [r.get("collapse_reason") or "collapsed" for r in dino if r.get("collapsed")]
    rate = by_metric.get("images_per_s", {}).get("value")
    spent = by_metric.get("train_seconds", {}).get("value")
    scored = by_metric.get("val_knn_top1" if split == "validation" else "knn_top1", {})
    n_eval = scored.get("n_val" if split == "validation" else "n_test")
    return {"knn": None if knn is None else float(knn), "split": split, "time_to": times,
            "n_eval": None if n_eval is None else int(n_eval),
            "collapsed": bool(reasons), "collapse_reason": reasons[0] if reasons else "",
            "images_per_s": images_per_s(history) if rate is None else float(rate),
            "train_seconds": train_seconds(history) if spent is None else float(spent),
            "references": references, "curve": {"seconds": xs, "knn": ys}}


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(dataset: str, variant: dict, units: list[dict], levels) -> dict:
    """One table line from a variant's per-seed summaries on one dataset."""
    knns = [u["knn"] for u in units if u["knn"] is not None]
    time_cols = {}
    for level in levels:
        # Not reached = slower than any budget: it pulls the median up and is counted.
        ts = [math.inf if u["time_to"].get(level) is None else float(u["time_to"][level])
              for u in units]
        med = statistics.median(ts) if ts else None
        time_cols[_level_key(level)] = {
            "median_seconds": None if med is None or math.isinf(med) else med,
            "not_reached": sum(math.isinf(t) for t in ts)}
    reasons = list(dict.fromkeys(u["collapse_reason"] for u in units if u["collapsed"]))
    return {"dataset": dataset, "variant": variant["name"], "recipe": variant["recipe"],
            "overrides": variant["overrides"], "baseline": variant.get("baseline", False),
            "seeds": len(units), "knn_split": "/".join(sorted({u["split"] for u in units})),
            "knn_median": _median(knns), "knn_min": min(knns) if knns else None,
            "knn_max": max(knns) if knns else None, "time_to_knn": time_cols,
            "n_eval": _median([u.get("n_eval") for u in units]),
            "collapsed": sum(u["collapsed"] for u in units), "collapse_reasons": reasons,
            "images_per_s": _median([u["images_per_s"] for u in units]),
            "train_seconds": _median([u["train_seconds"] for u in units]),
            "references": {m: _median([u.get("references", {}).get(m) for u in units])
                           for m in ["random-init", "pixels"] + _resized_pixels(units)}}


def _resized_pixels(items: list[dict]) -> list[str]:
    """The ``pixels-<size>px`` references of units or lines, by name."""
    return sorted({m for u in items for m in u.get("references", {})
                   if is_resized_pixels(m)})


def _level_key(level: float) -> str:
    return f"{level:g}"


def sort_lines(lines: list[dict]) -> list[dict]:
    """Datasets in first-seen order; inside each, best median k-NN first (none last)."""
    first: dict = {}
    for line in lines:
        first.setdefault(line["dataset"], len(first))
    return sorted(lines, key=lambda s: (first[s["dataset"]], s["knn_median"] is None,
                                        -(s["knn_median"] or 0.0)))


def _num(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _time_cell(cell: dict, seeds: int) -> str:
    if cell["median_seconds"] is None:
        return f"not reached ({cell['not_reached']}/{seeds})"
    missed = f" ({cell['not_reached']}/{seeds} not reached)" if cell["not_reached"] else ""
    return f"{cell['median_seconds']:,.1f}{missed}"


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy (%) measured on ``n`` images:
    how far the score on these images may sit from the same model's on new ones."""
    p = accuracy / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def _noise_sentence(mine: list[dict]) -> str:
    """The split's sampling error at the median score, when every run recorded the size
    of one and the same split (older results did not): on 1,000 images a gap of a few
    tenths is within it, and a table of medians does not say so by itself."""
    sizes = {s.get("n_eval") for s in mine}
    splits = {s["knn_split"] for s in mine}
    knn = _median([s["knn_median"] for s in mine])
    n = sizes.pop() if len(sizes) == 1 else None
    if not n or len(splits) != 1 or knn is None:
        return ""
    return (f" On these {int(n):,} images a score near the median ({knn:.1f}%) carries a "
            f"binomial standard error of {standard_error(knn, int(n)):.2f} points.")


def markdown(lines: list[dict], levels: dict[str, tuple], header: str = "") -> str:
    """One table per dataset (``levels``: its k-NN levels), best variant first."""
    out = [header] if header else []
    for dataset in dict.fromkeys(s["dataset"] for s in lines):
        mine = [s for s in lines if s["dataset"] == dataset]
        splits = sorted({s["knn_split"] for s in mine})
        pixels = _median([s["references"].get("pixels") for s in mine])
        refs = [f"raw pixels: {pixels:.2f}"] if pixels is not None else []
        for name in _resized_pixels(mine):  # the variants that read their images shrunk
            value = _median([s["references"].get(name) for s in mine])
            if value is not None:
                refs.append(f"{name}, as the model reads them: {value:.2f}")
        out.append(f"## {dataset}\n\nk-NN top-1 (%) of the DINO teacher on the "
                   f"{' / '.join(splits)} split, beside a random-init ViT of the same shape"
                   + (f" ({'; '.join(refs)})" if refs else "")
                   + "; seconds are training seconds (evaluation excluded), medians over "
                   "seeds." + _noise_sentence(mine) + "\n")
        head = (["variant", "seeds", "k-NN median", "k-NN min–max", "random-init"]
                + [f"s to {_level_key(lv)}%" for lv in levels[dataset]]
                + ["collapsed", "images/s", "train s"])
        align = ["---"] + ["---:"] * (len(head) - 4) + ["---", "---:", "---:"]
        rows = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        for s in mine:
            collapsed = f"{s['collapsed']}/{s['seeds']}" + (
                f" ({'; '.join(s['collapse_reasons'])})" if s["collapsed"] else "")
            cells = ([f"`{s['variant']}`", str(s["seeds"]), _num(s["knn_median"], 2),
                      f"{_num(s['knn_min'], 2)}–{_num(s['knn_max'], 2)}"
                      if s["knn_min"] is not None else "—",
                      _num(s["references"].get("random-init"), 2)]
                     + [_time_cell(s["time_to_knn"][_level_key(lv)], s["seeds"])
                        for lv in levels[dataset]]
                     + [collapsed, _num(s["images_per_s"], 0), _num(s["train_seconds"])])
            rows.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(rows) + "\n")
    return "\n".join(out)


def to_csv(lines: list[dict], levels: dict[str, tuple]) -> str:
    """One line per (dataset, variant); a level column is empty for a dataset without
    that level."""
    union = sorted({lv for lvs in levels.values() for lv in lvs})
    fields = (["dataset", "variant", "recipe", "overrides", "baseline", "seeds", "knn_split",
               "knn_median", "knn_min", "knn_max", "random_init_knn", "pixels_knn",
               "pixels_input", "pixels_input_knn"]
              + [f"time_to_{_level_key(lv)}_{k}" for lv in union
                 for k in ("median_seconds", "not_reached")]
              + ["collapsed", "collapse_reasons", "images_per_s", "train_seconds"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for s in lines:
        flat = {k: s[k] for k in fields if k in s}
        flat["overrides"] = ";".join(f"{k}={v}" for k, v in s["overrides"].items())
        flat["collapse_reasons"] = "; ".join(s["collapse_reasons"])
        flat["random_init_knn"] = s["references"].get("random-init")
        flat["pixels_knn"] = s["references"].get("pixels")
        resized = _resized_pixels([s])  # at most one: a variant has one input size
        flat["pixels_input"] = resized[0] if resized else None
        flat["pixels_input_knn"] = s["references"].get(resized[0]) if resized else None
        for key, cell in s["time_to_knn"].items():
            for k, v in cell.items():
                flat[f"time_to_{key}_{k}"] = v
        writer.writerow(flat)
    return buf.getvalue()


def knn_vs_time_figure(curves: dict[str, dict[str, list[dict]]], path, title: str = "",
                       splits: dict[str, str] | None = None) -> None:
    """Validation k-NN against training seconds, one panel per dataset: per variant a
    thin line per seed and a bold line through the medians (over seeds) of the seconds
    and of the k-NN at each evaluation all its seeds reached. ``splits`` names the split
    the k-NN was measured on, per dataset.

    ``curves[dataset][variant]`` is a list of ``{"seconds": [...], "knn": [...]}``, one
    per seed, in the table's order (the legend reads best first)."""
    # Imported here: matplotlib costs a noticeable start-up for every CLI call otherwise.
    # pyplot comes through figures, which selects the Agg backend before importing it.
    from .figures import _save, plt

    fig, axes = plt.subplots(1, len(curves), figsize=(7.0 * len(curves), 4.6),
                             squeeze=False)
    for ax, (dataset, variants) in zip(axes[0], curves.items()):
        cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
        for i, (name, seeds) in enumerate(variants.items()):
            colour = cmap(i % cmap.N)
            for c in seeds:
                if len(seeds) > 1:
                    ax.plot(c["seconds"], c["knn"], color=colour, lw=0.7, alpha=0.35)
            n = min((len(c["seconds"]) for c in seeds), default=0)
            xs = [statistics.median(c["seconds"][j] for c in seeds) for j in range(n)]
            ys = [statistics.median(c["knn"][j] for c in seeds) for j in range(n)]
            ax.plot(xs, ys, color=colour, lw=1.8, marker=".", label=name)
        ax.set_title(dataset)
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel(f"k-NN top-1 (%), {(splits or {}).get(dataset, 'validation')} split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
