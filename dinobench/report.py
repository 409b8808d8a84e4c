"""Result rows -> Markdown, CSV and JSON tables, and the figures.

A row is one long-format record per (dataset, model, metric, seed): the keys
``dataset``, ``model``, ``metric``, ``value`` plus context (``recipe``, ``epochs``,
``seed``, ``n_train``, ``device``, ``seconds``, ...). ``results.json`` holds the rows, the
run's metadata and the arrays the figures are drawn from, so ``dinobench report`` can
rebuild every table and figure without training.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .config import EVAL_FEATURES, is_pixels
from .errors import UserError
from .figures import (
    attention_figure,
    attention_grid_figure,
    bars_figure,
    knn_time_figure,
    learning_curves_figure,
    lines_figure,
)
from .io import atomic_write_json, atomic_write_text

KEY = ("dataset", "model", "metric")
# Scores are percentages (accuracy, Jaccard, mass, hit rate, area); the cost of training
# is in seconds and images per second.
UNITS = {m: "%" for m in (
    "knn_top1", "knn_top1_k200_t0.1", "val_knn_top1", "linear_top1", "label_budget_top1",
    "jaccard_best_head", "jaccard_mean_head", "mass_inside", "pointing_game", "fg_area",
    "fg_scored")} | {"time_to_knn": " s", "train_seconds": " s", "eval_seconds": " s",
                     "images_per_s": " img/s"}
OVERLAP = ("jaccard_best_head", "jaccard_mean_head", "mass_inside", "pointing_game")
# Columns of the time-to-accuracy table after the levels: metric -> header.
TIMING = {"val_knn_top1": "final val k-NN (%)", "train_seconds": "train s",
          "eval_seconds": "eval s", "images_per_s": "images/s"}
# Columns of the summary table: metric -> header.
SUMMARY = {"knn_top1": "k-NN (k 20)", "knn_top1_k200_t0.1": "k-NN (k 200)",
           "linear_top1": "linear", "jaccard_best_head": "Jaccard, best head",
           "jaccard_mean_head": "Jaccard, mean head", "mass_inside": "mass inside",
           "pointing_game": "pointing game", "fg_area": "foreground area",
           "fg_scored": "images scored"}


def summarize(rows: list[dict]) -> list[dict]:
    """Group rows by (dataset, model, metric) and, for label-budget rows, the number of
    labels, for time-to-accuracy rows the level (``threshold``); mean and sample standard
    deviation over seeds, in first-seen order.

    Rows flagged ``collapsed`` are left out of the mean and counted in ``n_collapsed``:
    a collapsed model's score is not a measurement of what DINO learns. A value of None
    (a level never reached) is counted in ``n_missing``, apart from the mean."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(row[k] for k in KEY) + (row.get("n_labels"), row.get("threshold"))
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        kept = [r["value"] for r in members if not r.get("collapsed")]
        values = [float(v) for v in kept if v is not None and not math.isnan(float(v))]
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
               if n > 1 else 0.0)
        first = members[0]
        out.append({**dict(zip(KEY, key)), "mean": mean, "std": std, "n": n,
                    "n_collapsed": len(members) - len(kept),
                    "n_missing": len(kept) - n, "threshold": key[-1],
                    "epochs": first.get("epochs"), "n_train": first.get("n_train"),
                    "recipe": first.get("recipe"), "n_labels": key[-2],
                    "background": first.get("background"),
                    "image_size": first.get("image_size")})
    return out


def _fmt(mean: float, std: float, n: int, n_collapsed: int = 0, n_missing: int = 0) -> str:
    """A cell: ``mean ± std`` over the seeds measured; "not reached" when no seed's run
    reached a time-to-accuracy level (and "k/n reached" when only some did)."""
    if n == 0:
        return ("not reached" if n_missing else
                f"collapsed ({n_collapsed})" if n_collapsed else "—")
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
    text += f" ({n}/{n + n_missing} reached)" if n_missing else ""
    return text + (f" ({n_collapsed} collapsed)" if n_collapsed else "")


def _cell(s: dict) -> str:
    return _fmt(s["mean"], s["std"], s["n"], s["n_collapsed"], s.get("n_missing", 0))


def _metric_label(s: dict) -> str:
    if s["metric"] == "label_budget_top1":
        return f"{s['metric']} @ {s['n_labels']} labels"
    if s.get("threshold") is not None:
        return f"{s['metric']} @ {s['threshold']:g}%"
    return s["metric"]


def long_table(summary: list[dict]) -> str:
    """Every (dataset, model, metric): mean ± std over seeds."""
    lines = ["| dataset | model | metric | value | seeds | epochs | n_train |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in summary:
        unit = UNITS.get(s["metric"], "")
        lines.append(f"| {s['dataset']} | {s['model']} | {_metric_label(s)} | "
                     f"{_cell(s)}"
                     f"{unit if s['n'] else ''} | {s['n'] + s.get('n_missing', 0)} | "
                     f"{s['epochs']} | {s['n_train']} |")
    return "\n".join(lines) + "\n"


def _pivot(summary: list[dict], row_key, col_key, corner: list[str],
           cols: list | None = None) -> str:
    """A Markdown table of ``mean ± std`` cells: one line per distinct ``row_key(s)``
    (a tuple) in first-seen order, one column per ``cols`` entry (default: distinct
    ``col_key(s)`` in first-seen order)."""
    cells: dict[tuple, dict] = {}
    seen: list = []
    for s in summary:
        r, c = row_key(s), col_key(s)
        seen += [c] if c not in seen else []
        cells.setdefault(r, {})[c] = _cell(s)
    if not cells:
        return ""
    cols = seen if cols is None else cols
    lines = ["| " + " | ".join(corner + [str(c) for c in cols]) + " |",
             "|" + "---|" * len(corner) + "---:|" * len(cols)]
    for r, row in cells.items():
        lines.append("| " + " | ".join([str(v) for v in r] +
                                       [row.get(c, "—") for c in cols]) + " |")
    return "\n".join(lines) + "\n"


def _model_rank(model: str) -> int:
    """DINO first, then its references: the supervised ViT, random init, raw pixels,
    uniform."""
    for rank, prefix in enumerate(("dino", "supervised", "random-init", "pixels", "uniform")):
        if model.startswith(prefix):
            return rank
    return 5


def _group_models(summary: list[dict], group) -> list[dict]:
    """Stable sort: groups (``group(s)``) in first-seen order, models ranked inside."""
    first: dict = {}
    for s in summary:
        first.setdefault(group(s), len(first))
    return sorted(summary, key=lambda s: (first[group(s)], _model_rank(s["model"])))


def summary_table(summary: list[dict], leading: tuple[str, ...] = ()) -> str:
    """One line per (dataset, model), the headline metrics side by side (%), so each
    score sits beside its chance references (random-init, uniform)."""
    keep = _group_models([s for s in summary if s["metric"] in SUMMARY],
                         lambda s: tuple(s.get(k) for k in leading) + (s["dataset"],))
    cols = [h for m, h in SUMMARY.items() if any(s["metric"] == m for s in keep)]
    return _pivot(keep, lambda s: tuple(s.get(k) for k in leading) +
                  (s["dataset"], s["model"]), lambda s: SUMMARY[s["metric"]],
                  list(leading) + ["dataset", "model"], cols=cols)


def pixels_note(summary: list[dict], leading: tuple[str, ...] = ()) -> str:
    """A note for under the summary: per dataset, the models whose k-NN (k 20) is at or
    below the raw pixels' (what k-NN gets from the images themselves, at the stored size
    or, the stronger of the two, at the model's input size where it reads them resized),
    so that a representation that does not beat its input reads that way. Empty without
    pixel rows."""
    knn = [s for s in summary if s["metric"] == "knn_top1" and s["n"]]
    group = lambda s: tuple(s.get(k) for k in leading) + (s["dataset"],)
    pixels: dict = {}  # group -> {pixel reference: mean}, at the stored size first
    for s in sorted((s for s in knn if is_pixels(s["model"])),
                    key=lambda s: s["model"] != "pixels"):
        pixels.setdefault(group(s), {})[s["model"]] = s["mean"]
    if not pixels:
        return ""
    lines = []
    for g, refs in pixels.items():
        # The stronger of the pixel references: the pixels at the stored size, and at
        # the model's input size where it reads them resized.
        ref = max(refs.values())
        below = [f"{s['model']} ({s['mean']:.2f})" for s in knn
                 if group(s) == g and not is_pixels(s["model"]) and s["mean"] <= ref]
        if below:
            named = ", ".join(f"{'raw pixels' if m == 'pixels' else m} {v:.2f}"
                              for m, v in refs.items())
            lines.append(f"- {' / '.join(map(str, g))}: {', '.join(below)}; {named}")
    if not lines:
        return "Every model's k-NN (k 20) is above the raw pixels'.\n"
    return ("k-NN (k 20) at or below the raw pixels' (these representations do not beat "
            "the images they were given):\n\n" + "\n".join(lines) + "\n")


def time_table(summary: list[dict]) -> str:
    """Time to accuracy: one line per (dataset, model), the train seconds at which each
    validation k-NN level was first reached ("not reached" when the run ended below it),
    then the final validation k-NN and what training cost."""
    keep = _group_models([s for s in summary if s["metric"] == "time_to_knn"
                          or s["metric"] in TIMING], lambda s: s["dataset"])
    if not any(s["metric"] == "time_to_knn" for s in keep):
        return ""
    label = lambda s: (f"≥ {s['threshold']:g}%" if s["metric"] == "time_to_knn"
                       else TIMING[s["metric"]])
    levels = list(dict.fromkeys(label(s) for s in keep if s["metric"] == "time_to_knn"))
    cols = levels + [h for m, h in TIMING.items() if any(s["metric"] == m for s in keep)]
    return _pivot(keep, lambda s: (s["dataset"], s["model"]), label, ["dataset", "model"],
                  cols=cols)


def provenance(meta: dict | None) -> str:
    """How the run was made, from its ``meta``: the command, commit, machine, seeds and
    wall time, joined by " · "; empty for metadata without a command."""
    if not isinstance(meta, dict) or not meta.get("command"):
        return ""
    parts = [f"`{meta['command']}`"]
    if meta.get("git_commit"):
        parts.append(f"commit {meta['git_commit']}")
    if meta.get("machine"):
        threads = f", {meta['threads']} threads" if meta.get("threads") else ""
        bf16 = ", bf16 autocast" if meta.get("precision") == "bf16" else ""
        parts.append(f"{meta['machine']}{threads}{bf16}")
    if meta.get("seeds"):
        parts.append("seeds " + " ".join(str(s) for s in meta["seeds"]))
    if meta.get("seconds") is not None:
        parts.append(f"{meta['seconds'] / 60:.1f} min wall")
    return " · ".join(parts)


def provenance_note(meta: dict | None) -> str:
    """The :func:`provenance` line that opens a run's results.md."""
    made = provenance(meta)
    return f"Made by {made}.\n\n" if made else ""


def features_note(meta: dict | None) -> str:
    """Which ViT features the k-NN and probe scores come from; empty for results
    written before there was a choice."""
    feature = meta.get("eval_feature") if isinstance(meta, dict) else None
    if feature is None:
        return ""
    return f"ViT features (k-NN and linear probes): {EVAL_FEATURES.get(feature, feature)}.\n\n"


def validation_note(meta: dict | None) -> str:
    """Whether the validation images were pre-trained on; empty for results written
    before there was a choice (they were)."""
    unseen = meta.get("val_unseen") if isinstance(meta, dict) else None
    if unseen is None:
        return ""
    return ("Validation images held out of pre-training (--val-unseen).\n\n" if unseen
            else "Validation images also pre-trained on, their labels unseen "
            "(--val-unseen holds them out).\n\n")


def to_markdown(rows: list[dict], meta: dict | None = None) -> str:
    """The long table; when the rows hold more than k-NN, sections before it: a summary
    across datasets, labels versus no labels, and background x resolution. Led by
    :func:`provenance_note` and :func:`features_note` of the run's ``meta``."""
    note = provenance_note(meta) + features_note(meta)
    summary = summarize(rows)
    if all(s["metric"] == "knn_top1" for s in summary):
        return note + long_table(summary)
    table, times = summary_table(summary), time_table(summary)
    sections = [("Summary (top-1 and overlap scores, %)",
                 table + ("\n" + pixels_note(summary) if table and pixels_note(summary)
                          else "")),
                ("Time to validation k-NN (seconds of training, evaluations excluded)",
                 validation_note(meta) + times if times else ""),
                ("Labels versus no labels: test top-1 (%) by number of labelled images",
                 _pivot(_group_models([s for s in summary
                                       if s["metric"] == "label_budget_top1"],
                                      lambda s: (s["dataset"], s["n_labels"])),
                        lambda s: (s["dataset"], s["n_labels"]), lambda s: s["model"],
                        ["dataset", "labels"]))]
    for metric in OVERLAP:
        sections.append((f"Background and resolution: {metric} (%) by image size",
                         _pivot(_group_models([s for s in summary if s["metric"] == metric
                                               and s["background"] is not None],
                                              lambda s: s["background"]),
                                lambda s: (s["background"], s["model"]),
                                lambda s: f"{s['image_size']} px",
                                ["background", "model"])))
    sections.append(("All rows", long_table(summary)))
    return note + "\n".join(f"## {title}\n\n{table}" for title, table in sections if table)


def to_csv(rows: list[dict]) -> str:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir: Path, rows: list[dict], meta: dict | None = None) -> str:
    md = to_markdown(rows, meta)
    atomic_write_text(out_dir / "results.md", md)
    atomic_write_text(out_dir / "results.csv", to_csv(rows))
    return md


def write_figures(out_dir: Path, figures: dict, rows: list[dict] | None = None
                  ) -> list[Path]:
    """Attention grids and learning curves from ``figures``; overlap bars, label-budget
    and background x resolution plots from ``rows`` (mean ± std over seeds)."""
    written = []
    for item in figures.get("attention", []):
        if isinstance(item["maps"], dict):  # several models on the same images
            path = out_dir / f"attention_{item['dataset']}.png"
            attention_grid_figure(item["images"], item["maps"], path,
                                  title=f"{item['dataset']}: last block, CLS query, mean "
                                        "over heads", foreground=item.get("foreground"))
        else:
            path = out_dir / f"attention_{item['dataset']}_{item['model']}.png"
            attention_figure(item["images"], item["maps"], path,
                             title=f"{item['dataset']}: {item['model']} (last block, CLS "
                                   "query, mean over heads)")
        written.append(path)
    curves: dict[str, list] = {}
    for item in figures.get("curves", []):
        curves.setdefault(item["dataset"], []).append(item)
    for dataset, items in curves.items():
        path = out_dir / f"curves_{dataset}.png"
        learning_curves_figure(items, path, title=f"{dataset}: learning curves")
        written.append(path)
    summary = summarize(rows or [])
    timed = [c for c in figures.get("curves", []) if c.get("train_seconds")
             and any(v is not None for v in c.get("val_top1") or [])]
    if timed:  # every model and seed of the run, against the time it trained
        references: dict[str, dict] = {}
        for s in summary:
            if s["metric"] == "val_knn_top1" and s["n"] and (
                    s["model"] == "random-init" or is_pixels(s["model"])):
                references.setdefault(s["dataset"], {})[s["model"]] = s["mean"]
        path = out_dir / "knn_vs_time.png"
        knn_time_figure(timed, path, references,
                        title="validation k-NN against training time (dotted: the "
                              "time-to-accuracy levels)")
        written.append(path)
    return written + _row_figures(out_dir, summary)


def _row_figures(out_dir: Path, summary: list[dict]) -> list[Path]:
    written = []
    plain = [s for s in summary if s["metric"] in OVERLAP and s["background"] is None]
    for dataset in dict.fromkeys(s["dataset"] for s in plain):
        mine = [s for s in plain if s["dataset"] == dataset]
        series = {}
        for model in dict.fromkeys(s["model"] for s in mine):
            by = {s["metric"]: s for s in mine if s["model"] == model}
            series[model] = ([by[m]["mean"] if m in by else None for m in OVERLAP],
                             [by[m]["std"] if m in by else None for m in OVERLAP])
        path = out_dir / f"overlap_{dataset}.png"
        bars_figure(list(OVERLAP), series, path, reference="uniform",
                    title=f"{dataset}: attention vs foreground (uniform = chance, dashed)")
        written.append(path)
    budget = [s for s in summary if s["metric"] == "label_budget_top1"]
    for dataset in dict.fromkeys(s["dataset"] for s in budget):
        lines = {}
        for s in (s for s in budget if s["dataset"] == dataset):
            xs, ys = lines.setdefault(s["model"], ([], []))
            xs.append(s["n_labels"])
            ys.append(s["mean"])
        path = out_dir / f"label_budget_{dataset}.png"
        lines_figure({"": {"test top-1": lines}}, path, xlabel="labelled images",
                     logx=True, title=f"{dataset}: labels versus no labels "
                                      "(DINO: linear probe; supervised: trained on them)")
        written.append(path)
    comp = [s for s in summary if s["metric"] in OVERLAP and s["background"] is not None]
    if comp:
        panels: dict[str, dict] = {}  # metric -> background -> model -> (sizes, means)
        for s in comp:
            xs, ys = panels.setdefault(s["metric"], {}).setdefault(
                f"{s['background']} background", {}).setdefault(s["model"], ([], []))
            xs.append(s["image_size"])
            ys.append(s["mean"])
        path = out_dir / "composites.png"
        lines_figure(panels, path, xlabel="image side (px), 8x8 patches",
                     title="MNIST composites: background x resolution")
        written.append(path)
    return written


def write_results(out_dir: str | Path, rows: list[dict], meta: dict,
                  figures: dict) -> str:
    """Write results.json (first: it is the source of truth), tables and figures."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", {"meta": meta, "rows": rows,
                                                 "figures": figures})
    md = write_tables(out_dir, rows, meta)
    write_figures(out_dir, figures, rows)
    return md


def load_results(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path} does not exist; point 'report' at a folder written by "
                        "'dinobench run'") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun the job that wrote it") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and {"dataset", "model", "metric", "value"} <= r.keys()
            for r in rows):
        raise UserError(f"{path} has no list of result rows (dataset, model, metric, value); "
                        "it was not written by dinobench")
    return data


def rebuild(out_dir: str | Path) -> str:
    """Re-create results.md, results.csv and the figures from results.json."""
    data = load_results(out_dir)
    md = write_tables(Path(out_dir), data["rows"], data.get("meta"))
    write_figures(Path(out_dir), data.get("figures", {}), data["rows"])
    return md


def index_markdown(root: str | Path) -> str:
    """The results index: ``root/findings.md`` first when there is one (the prose that
    reads the tables), then one summary table across every run folder under ``root``
    (any depth; each holding a results.json), a line per (run, dataset, model), what made
    each run, and a line per sweep pointing to its table. A sweep's per-seed unit folders
    are left to the sweep's own table."""
    root = Path(root)
    summary, made = [], []
    for path in sorted(root.glob("**/results.json")):
        inside = [p for p in path.parents if p == root or root in p.parents]
        if (path.parent / "sweep_unit.json").is_file() or any(
                (p / "sweep.json").is_file() for p in inside):
            continue
        run = path.parent.relative_to(root).as_posix()
        data = load_results(path.parent)
        summary += [{**s, "run": run} for s in summarize(data["rows"])]
        line = provenance(data.get("meta"))
        if line:
            made.append(f"- [{run}]({run}/results.md): {line}.")
    sweeps = []
    for path in sorted(root.glob("**/sweep.json")):
        folder = path.parent.relative_to(root).as_posix()
        try:
            command = json.loads(path.read_text()).get("command", "")
        except (OSError, json.JSONDecodeError):
            command = ""
        sweeps.append(f"- [{folder}]({folder}/sweep.md)" + (f": `{command}`" if command
                                                             else ""))
    table = summary_table(summary, leading=("run",))
    if not table and not sweeps:
        return ""
    findings = root / "findings.md"
    parts = [findings.read_text().rstrip() + "\n\n" if findings.is_file() else "",
             "# Results\n\n"]
    if table:
        note = pixels_note(summary, leading=("run",))
        parts += ["Top-1 accuracies and attention-foreground overlap scores (%), mean ± std "
                  "over seeds, gathered from every run folder here. Each run's results.md "
                  "holds all its tables.\n\n", table, "\n" + note if note else ""]
    if made:
        parts += ["\n## How each run was made\n\n", "\n".join(made) + "\n"]
    if sweeps:
        parts += ["\n## Studies (sweeps; each sweep.md has the table over variants and "
                  "seeds)\n\n", "\n".join(sweeps) + "\n"]
    return "".join(parts)


def write_index(root: str | Path) -> str:
    """Write ``root/README.md`` from :func:`index_markdown`; returns its text."""
    md = index_markdown(root)
    if not md:
        raise UserError(f"no run folder with a results.json under {root}; run "
                        "'dinobench run' first")
    atomic_write_text(Path(root) / "README.md", md)
    return md
