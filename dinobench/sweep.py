"""A recipe study: ``python -m dinobench sweep``.

Runs a grid of recipe variants (:mod:`dinobench.sweep_grid`), each over the same seeds
and budget, every (variant, seed) a full ``dinobench run`` into its own run folder, then
one table and one figure across them (:mod:`dinobench.sweep_table`)::

    <out>/sweep.json, sweep.md, sweep.csv     the manifest (grid, command) and the table
    <out>/knn_vs_time.png                     k-NN against training seconds per variant
    <out>/variants/<variant>/seed<N>/         a run folder (results.json, train log, ...)
    <out>/variants/<variant>/seed<N>/sweep_unit.json   the options it ran with

A killed sweep, rerun with the same command, skips the (variant, seed) runs that finished
with the same options, resumes unfinished ones from their checkpoints, and starts the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .config import EVAL_FEATURES
from .errors import ConfigError, UserError
from .eval.time_to_accuracy import knn_levels
from .io import atomic_write_json, atomic_write_text
from .runfolder import RunFolder
from .sweep_cli import add_sweep_parser  # noqa: F401 - cli.py takes the parser from here
from .sweep_grid import Variant, expand, grid_values
from .sweep_table import (
    aggregate,
    knn_vs_time_figure,
    markdown,
    sort_lines,
    to_csv,
    unit_summary,
)

MANIFEST = "sweep.json"
UNIT_MARKER = "sweep_unit.json"
# RunOptions fields that do not change what a run computes: left out of the identity
# that decides whether a finished run can be reused.
_NOT_IDENTITY = ("out", "resume", "restart", "progress", "checkpoint_every", "seeds")
# RunOptions fields added after sweeps were first written: left out at their default,
# which is what those sweeps computed, so rerunning one still finds its runs.
_LATER_DEFAULTS = {"eval_feature": "cls", "precision": "auto", "val_unseen": False}


@dataclasses.dataclass
class SweepOptions:
    variants: list[Variant]
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    out: str | Path = "results/studies/sweep"
    # RunOptions fields shared by every run (datasets, profile, budget, data, device...).
    run: dict = dataclasses.field(default_factory=dict)
    levels: tuple[float, ...] | None = None  # k-NN levels (%); None: each dataset's
    restart: bool = False  # discard a different sweep in ``out``
    command: str | None = None  # recorded in the manifest; None: this process's argv


def unit_dir(out: Path, variant: Variant, seed: int) -> Path:
    return out / "variants" / variant.slug / f"seed{seed}"


def _run_options(opts: SweepOptions, variant: Variant, seeds: list[int], out: Path | None):
    from .run import RunOptions

    return RunOptions(**opts.run, recipe=variant.recipe, overrides=dict(variant.overrides),
                      seeds=list(seeds), out=out)


def identity(run_opts) -> dict:
    """What a run computes from: its options less output and bookkeeping, as JSON."""
    d = {k: v for k, v in dataclasses.asdict(run_opts).items() if k not in _NOT_IDENTITY
         and not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}
    return json.loads(json.dumps(d, default=str))


def _grid(opts: SweepOptions) -> dict:
    base = identity(_run_options(opts, Variant("", "seed"), opts.seeds, None))
    for k in ("recipe", "overrides"):
        base.pop(k)
    return {"variants": [v.as_json() for v in opts.variants], "seeds": list(opts.seeds),
            "run": base}


def _differences(old: dict, new: dict) -> str:
    parts = []
    if old.get("variants") != new["variants"]:
        parts.append("variants: " + " ".join(v["name"] for v in old.get("variants") or [])
                     + " -> " + " ".join(v["name"] for v in new["variants"]))
    if old.get("seeds") != new["seeds"]:
        parts.append(f"seeds {old.get('seeds')} -> {new['seeds']}")
    run_old = old.get("run") or {}
    changed = [k for k in dict.fromkeys([*run_old, *new["run"]])
               if run_old.get(k) != new["run"].get(k)]
    if changed:
        parts.append("options " + ", ".join(changed))
    return "; ".join(parts) or "the grid"


def _check_manifest(out: Path, grid: dict, restart: bool) -> None:
    path = out / MANIFEST
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        old_grid = old["grid"]
    except (OSError, ValueError, KeyError, TypeError):
        if restart:
            return
        raise UserError(f"{path} is not a sweep manifest; choose another --out, or add "
                        "--restart to discard the sweep there") from None
    if old_grid != grid and not restart:
        raise UserError(f"{out} holds a different sweep ({_differences(old_grid, grid)}); "
                        f"rerun it with its own command (recorded in {path}), choose another "
                        "--out, or add --restart to discard it")


def _discard(out: Path) -> None:
    """What a sweep wrote in ``out`` (never anything else there)."""
    shutil.rmtree(out / "variants", ignore_errors=True)
    for name in (MANIFEST, "sweep.md", "sweep.csv", "knn_vs_time.png"):
        (out / name).unlink(missing_ok=True)


def _unit_state(folder: Path, ident: dict) -> str:
    """``done`` (finished with these options), ``resume`` (started with them and left
    a checkpoint) or ``fresh`` (nothing usable: start over)."""
    marker = folder / UNIT_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return "fresh"
    if not isinstance(saved, dict) or saved.get("options") != ident:
        return "fresh"
    if saved.get("finished") and (folder / "results.json").exists():
        return "done"
    return "resume" if any((folder / "checkpoints").glob("*")) else "fresh"


def run_unit(run_opts, log: Callable[[str], None]) -> None:
    """Train and evaluate one (variant, seed): ``dinobench run`` into its folder."""
    from .run import run

    run(run_opts, log=log)


def _read_unit(folder: Path, datasets: list[str], seed: int) -> dict[str, tuple]:
    """``{dataset: (rows, history)}`` of a finished run folder."""
    from .report import load_results

    rows = load_results(folder)["rows"]
    out = {}
    for name in datasets:
        log_path = RunFolder(folder).train_log(name, seed)
        try:
            history = [json.loads(line) for line in log_path.read_text().splitlines()
                       if line.strip()]
        except (OSError, ValueError):
            history = []  # the table then falls back on the rows alone
        out[name] = ([r for r in rows if r.get("dataset") == name], history)
    return out


def _unit_logger(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    def emit(msg: str) -> None:
        if msg.startswith("\n"):  # a run's closing table: the sweep prints its own
            msg = msg.strip().splitlines()[-1]
        log(f"{prefix} {msg}")
    return emit


def _levels(opts: SweepOptions, units: dict, dataset: str) -> tuple[float, ...]:
    """``--knn-levels``, else the thresholds of the runs' time_to_knn rows on
    ``dataset``, else the dataset's levels."""
    if opts.levels:
        return tuple(opts.levels)
    found = sorted({float(r["threshold"]) for per_ds in units.values()
                    for r in per_ds.get(dataset, ([], []))[0]
                    if r.get("metric") == "time_to_knn" and r.get("threshold") is not None})
    return tuple(found) or knn_levels(dataset)


def tabulate(opts: SweepOptions, units: dict) -> tuple[list[dict], dict, dict]:
    """Table lines, the k-NN levels per dataset and the figure's curves from ``units``:
    ``{(variant name, seed): {dataset: (rows, history)}}``."""
    datasets = list(opts.run.get("datasets") or ["digits"])
    levels = {d: _levels(opts, units, d) for d in datasets}
    lines, curves = [], {}
    for variant in opts.variants:
        for dataset in datasets:
            summaries = [unit_summary(*units[(variant.name, s)][dataset], levels[dataset])
                         for s in opts.seeds if (variant.name, s) in units]
            if summaries:
                lines.append(aggregate(dataset, variant.as_json(), summaries,
                                       levels[dataset]))
                curves.setdefault(dataset, {})[variant.name] = [u["curve"]
                                                               for u in summaries]
    lines = sort_lines(lines)
    ordered = {d: {s["variant"]: curves[d][s["variant"]] for s in lines if s["dataset"] == d}
               for d in curves}
    return lines, {d: lv for d, lv in levels.items() if d in curves}, ordered


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _header(opts: SweepOptions, n_done: int) -> str:
    r = opts.run
    budget = (f"{r['budget_seconds']:g} training seconds per run (schedules planned on the "
              "epochs)" if r.get("budget_seconds") else "the recipe's epochs")
    total = len(opts.variants) * len(opts.seeds)
    profile = r.get("profile") or "per dataset (quick for digits, full otherwise)"
    return (f"# Recipe study: {', '.join(r.get('datasets') or ['digits'])}\n\n"
            f"{_count(len(opts.variants), 'variant')} x {_count(len(opts.seeds), 'seed')} "
            f"({n_done}/{total} runs finished), recipe `{opts.variants[0].recipe}`, "
            f"profile {profile}, budget: {budget}. k-NN on "
            f"{EVAL_FEATURES[r.get('eval_feature') or 'cls']}. "
            + ("Validation images held out of pre-training (--val-unseen). "
               if r.get("val_unseen") else "Validation images also pre-trained on "
               "(labels unseen; --val-unseen holds them out). ") +
            "A variant is named after the flags that vary; `preset=...` lines are "
            "presets added by --compare-recipes. Sorted by median final k-NN. A seed that "
            "never reached a level counts as slower than any: the median reads \"not "
            "reached\" once half the seeds miss it. Each run's folder is "
            "variants/<variant>/seed<N>/.\n")


def write_tables(opts: SweepOptions, out: Path, grid: dict, units: dict,
                 figure: bool = False) -> str:
    lines, levels, curves = tabulate(opts, units)
    md = markdown(lines, levels, _header(opts, len(units)))
    atomic_write_json(out / MANIFEST, {"kind": "dinobench-sweep", "command": _command(opts),
                                       "grid": grid,
                                       "levels": {d: list(lv) for d, lv in levels.items()},
                                       "finished": sorted(f"{v}/seed{s}" for v, s in units),
                                       "table": lines})
    atomic_write_text(out / "sweep.md", md)
    atomic_write_text(out / "sweep.csv", to_csv(lines, levels))
    if figure and curves:
        splits = {s["dataset"]: s["knn_split"] for s in lines}
        knn_vs_time_figure(curves, out / "knn_vs_time.png", splits=splits,
                           title="k-NN against training seconds (bold: median over seeds)")
    return md


def _command(opts: SweepOptions) -> str:
    return opts.command or shlex.join(["dinobench", *sys.argv[1:]])


def sweep(opts: SweepOptions, log: Callable[[str], None] = print) -> list[dict]:
    """Run every (variant, seed) not finished yet, then write the table and figure.
    Returns the table lines, best variant first."""
    from .data import load_dataset
    from .run import RunInterrupted, check_data, check_options

    if not opts.variants:
        raise ConfigError("the grid is empty: give recipe flags or --compare-recipes")
    budget = opts.run.get("budget_seconds")
    if budget is not None and not budget > 0:
        raise ConfigError(f"--budget-seconds must be positive, got {budget:g}")
    if opts.levels is not None and not all(0 < lv <= 100 for lv in opts.levels):
        raise ConfigError(f"--knn-levels are percentages in (0, 100], got "
                          f"{' '.join(f'{lv:g}' for lv in opts.levels)}")
    out = Path(opts.out)
    # Every variant is checked, and the data loaded once, before anything is trained or
    # written: a bad value in the last variant must not surface hours into the sweep.
    per_variant = [_run_options(opts, v, opts.seeds, None) for v in opts.variants]
    for v, run_opts in zip(opts.variants, per_variant):
        try:
            check_options(run_opts)
        except UserError as e:
            raise type(e)(f"variant {v.name}: {e}") from None
    first = per_variant[0]
    data = [load_dataset(name, **first.data_kwargs()) for name in first.datasets]
    for v, run_opts in zip(opts.variants, per_variant):
        try:
            check_data(run_opts, data)
        except UserError as e:
            raise type(e)(f"variant {v.name}: {e}") from None
    del data
    grid = _grid(opts)
    units: dict = {}
    with RunFolder(out):  # one sweep at a time in a folder
        _check_manifest(out, grid, opts.restart)
        if opts.restart:
            _discard(out)
        write_tables(opts, out, grid, units)
        total = len(opts.variants) * len(opts.seeds)
        for v in opts.variants:
            for seed in opts.seeds:
                folder = unit_dir(out, v, seed)
                run_opts = _run_options(opts, v, [seed], folder)
                ident = identity(run_opts)
                state = _unit_state(folder, ident)
                tag = f"[{v.name} seed {seed}]"
                if state == "done":
                    log(f"{tag} finished earlier: reused")
                else:
                    log(f"{tag} {'resuming' if state == 'resume' else 'training'} "
                        f"({len(units) + 1}/{total})")
                    run_opts.resume, run_opts.restart = state == "resume", state == "fresh"
                    atomic_write_json(folder / UNIT_MARKER, {"options": ident,
                                                             "finished": False})
                    try:
                        run_unit(run_opts, _unit_logger(log, tag))
                    except RunInterrupted as e:
                        raise RunInterrupted(
                            f"stopped by signal {e.signum} in variant {v.name}, seed "
                            f"{seed} (its checkpoint is saved); rerun the same "
                            "'dinobench sweep' command to continue", e.signum) from None
                    atomic_write_json(folder / UNIT_MARKER, {"options": ident,
                                                             "finished": True})
                units[(v.name, seed)] = _read_unit(folder, first.datasets, seed)
                write_tables(opts, out, grid, units)
        md = write_tables(opts, out, grid, units, figure=True)
    log(f"\n{md}\nwrote {out}/sweep.{{md,csv,json}}, {out}/knn_vs_time.png and a run "
        f"folder per variant and seed under {out}/variants/")
    return tabulate(opts, units)[0]


# --- from the command line ---------------------------------------------------------
def options_from_args(args: argparse.Namespace) -> SweepOptions:
    """The arguments of :func:`dinobench.sweep_cli.add_sweep_parser`'s subcommand."""
    values, order = grid_values(args)
    variants = expand(args.recipe, values, order, args.compare_recipes)
    if args.knn_k < 1:
        raise ConfigError(f"--knn-k must be at least 1, got {args.knn_k}")
    if not args.knn_temperature > 0:
        raise ConfigError(f"--knn-temperature must be positive, got {args.knn_temperature}")
    if args.eval_every is not None and args.eval_every < 0:
        raise ConfigError(f"--eval-every must not be negative, got {args.eval_every}")
    run = {"datasets": list(args.datasets), "profile": args.profile, "device": args.device,
           "compile": args.compile, "precision": args.precision,
           "deterministic": args.deterministic,
           "checkpoint_every": args.checkpoint_every, "progress": not args.no_progress,
           "eval_every": args.eval_every, "knn_k": args.knn_k,
           "knn_temperature": args.knn_temperature, "probe": args.probe,
           "n_last_blocks": args.n_last_blocks, "eval_feature": args.eval_feature,
           "data_dir": args.data_dir,
           "download": args.download, "train_subset": args.train_subset,
           "labels_per_class": args.labels_per_class, "test_subset": args.test_subset,
           "pretrain_subset": args.pretrain_subset, "val_size": args.val_size,
           "val_unseen": args.val_unseen,
           "budget_seconds": args.budget_seconds,
           # The costly extras of a run, off: one supervised ViT per label budget, and the
           # attention figure.
           "label_budgets": (), "attention_images": 0}
    varied = [k for k in order if len(values[k]) > 1]
    out = args.out or (Path("results") / "studies" / "-".join(
        [*args.datasets, args.recipe, *(varied or ["base"])]))
    return SweepOptions(variants=variants, seeds=list(args.seeds), out=out, run=run,
                        levels=tuple(args.knn_levels) if args.knn_levels else None,
                        restart=args.restart, command=getattr(args, "typed", None))


def run_sweep(args: argparse.Namespace) -> None:
    sweep(options_from_args(args))
