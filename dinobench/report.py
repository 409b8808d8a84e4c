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

from .errors import UserError
from .figures import attention_figure
from .io import atomic_write_json, atomic_write_text

KEY = ("dataset", "model", "metric")
UNITS = {"knn_top1": "%"}


def summarize(rows: list[dict]) -> list[dict]:
    """Group rows by (dataset, model, metric); mean and sample standard deviation over
    seeds, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEY), []).append(row)
    out = []
    for key, members in groups.items():
        values = [float(r["value"]) for r in members]
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
               if len(values) > 1 else 0.0)
        first = members[0]
        out.append({**dict(zip(KEY, key)), "mean": mean, "std": std, "n": len(values),
                    "epochs": first.get("epochs"), "n_train": first.get("n_train"),
                    "recipe": first.get("recipe")})
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def to_markdown(rows: list[dict]) -> str:
    lines = ["| dataset | model | metric | value | seeds | epochs | n_train |",
             "|---|---|---|---:|---:|---:|---:|"]
    for s in summarize(rows):
        unit = UNITS.get(s["metric"], "")
        lines.append(f"| {s['dataset']} | {s['model']} | {s['metric']} | "
                     f"{_fmt(s['mean'], s['std'], s['n'])}{unit} | {s['n']} | "
                     f"{s['epochs']} | {s['n_train']} |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(out_dir: Path, rows: list[dict]) -> str:
    md = to_markdown(rows)
    atomic_write_text(out_dir / "results.md", md)
    atomic_write_text(out_dir / "results.csv", to_csv(rows))
    return md


def write_figures(out_dir: Path, figures: dict) -> list[Path]:
    written = []
    for item in figures.get("attention", []):
        path = out_dir / f"attention_{item['dataset']}_{item['model']}.png"
        attention_figure(item["images"], item["maps"], path,
                         title=f"{item['dataset']}: {item['model']} (last block, CLS query, "
                               "mean over heads)")
        written.append(path)
    return written


def write_results(out_dir: str | Path, rows: list[dict], meta: dict,
                  figures: dict) -> str:
    """Write results.json (first: it is the source of truth), tables and figures."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", {"meta": meta, "rows": rows,
                                                 "figures": figures})
    md = write_tables(out_dir, rows)
    write_figures(out_dir, figures)
    return md


def load_results(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; point 'report' at a folder written by "
                        "'dinobench run'") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun the job that wrote it") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise UserError(f"{path} has no 'rows' list; it was not written by dinobench")
    return data


def rebuild(out_dir: str | Path) -> str:
    """Re-create results.md, results.csv and the figures from results.json."""
    data = load_results(out_dir)
    md = write_tables(Path(out_dir), data["rows"])
    write_figures(Path(out_dir), data.get("figures", {}))
    return md
