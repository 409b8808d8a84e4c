"""``dinobench sweep``: grid expansion, resume, the table, errors, and one real sweep."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest

import dinobench.sweep as sweep_module
from dinobench.cli import build_parser, main
from dinobench.config import recipe_fields
from dinobench.errors import ConfigError, UserError
from dinobench.io import atomic_write_json, atomic_write_text
from dinobench.run import RunInterrupted
from dinobench.sweep import SweepOptions, options_from_args, sweep
from dinobench.sweep_grid import Variant, expand, parse_values
from dinobench.sweep_table import aggregate, markdown, sort_lines, to_csv, unit_summary
from helpers import TINY, one_line_error

FIELDS = {f.name: f for f in recipe_fields()}


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


# --- the grid ----------------------------------------------------------------------
def test_product_names_only_the_flags_that_vary_in_command_line_order():
    args = build_parser().parse_args(
        ["sweep", "--depth", "1", "--teacher-temp", "0.02", "0.04", "--out-dim", "256",
         "4096"])
    variants = options_from_args(args).variants
    # out_dim precedes teacher_temp in the Recipe; the names follow the command line.
    assert [v.name for v in variants] == [
        "teacher_temp=0.02,out_dim=256", "teacher_temp=0.02,out_dim=4096",
        "teacher_temp=0.04,out_dim=256", "teacher_temp=0.04,out_dim=4096"]
    assert variants[1].overrides == {"depth": 1, "teacher_temp": 0.02, "out_dim": 4096}
    assert all(v.recipe == "small" and not v.baseline for v in variants)


def test_a_grid_where_nothing_varies_is_one_base_variant():
    assert expand("seed", {"depth": [1], "lr": [0.001]}) == [
        Variant("base", "seed", {"depth": 1, "lr": 0.001})]


@pytest.mark.parametrize("tokens", [["0.4,1.0", "0.25,1.0"], ["0.4", "1.0", "0.25", "1.0"],
                                    ["0.4, 1.0", "0.25,1"]])
def test_tuple_fields_take_their_arity_per_value(tokens):
    assert parse_values(FIELDS["global_scale"], tokens) == [(0.4, 1.0), (0.25, 1.0)]


def test_tuple_values_of_other_arities_and_their_names():
    assert parse_values(FIELDS["global_scale"], ["0.4", "1.0"]) == [(0.4, 1.0)]
    assert parse_values(FIELDS["blur_p"], ["1,0.1,0.5", "0.5,0.5,0.5"]) == [
        (1.0, 0.1, 0.5), (0.5, 0.5, 0.5)]
    assert parse_values(FIELDS["jitter"], ["0.4", "0.4", "0.2", "0.1"]) == [
        (0.4, 0.4, 0.2, 0.1)]
    names = [v.name for v in expand("seed", {"global_scale": [(0.4, 1.0), (0.25, 1.0)]})]
    assert names == ["global_scale=0.4_1.0", "global_scale=0.25_1.0"]


@pytest.mark.parametrize(("field", "tokens", "expected"), [
    ("global_scale", ["0.4"], "--global-scale takes 2 numbers per value, got 1"),
    ("global_scale", ["0.4,1.0", "0.3"], "--global-scale takes 2 comma-joined numbers"),
    ("blur_p", ["1,0.1"], "--blur-p takes 3 comma-joined numbers"),
    ("out_dim", ["256", "2.5"], "--out-dim: '2.5' is not an integer"),
    ("out_dim", ["256", "256"], "--out-dim repeats the value 256"),
    ("local_from_global", ["maybe"], "--local-from-global: 'maybe' is not true or false"),
    ("head", ["mlp"], "--head: 'mlp' is not one of seed, official"),
    ("teacher_temp", [], "--teacher-temp needs at least one value"),
])
def test_malformed_values_name_the_flag(field, tokens, expected):
    with pytest.raises(ConfigError) as e:
        parse_values(FIELDS[field], tokens)
    assert expected in str(e.value)


def test_booleans():
    assert parse_values(FIELDS["local_from_global"], ["true", "No"]) == [True, False]
    assert expand("seed", {"local_from_global": [True, False]})[1].name == \
        "local_from_global=false"


def test_unset_compares_a_constant_koleo_weight_with_a_scheduled_one():
    assert parse_values(FIELDS["koleo_weight_end"], ["unset", "0"]) == [None, 0.0]
    with pytest.raises(ConfigError, match="--teacher-temp: 'unset' is not a number"):
        parse_values(FIELDS["teacher_temp"], ["unset"])  # only where None means unused
    with pytest.raises(ConfigError, match="--flip-p: 'unset' is not a number"):
        parse_values(FIELDS["flip_p"], ["unset"])  # there None is 'auto'


def test_compare_recipes_adds_presets_unchanged_but_for_the_budget():
    variants = expand("seed", {"depth": [1], "teacher_temp": [0.02, 0.04], "epochs": [5]},
                      compare=["seed", "official"])
    baselines = [v for v in variants if v.baseline]
    assert [(v.name, v.recipe, v.overrides) for v in baselines] == [
        ("preset=seed", "seed", {"epochs": 5}), ("preset=official", "official",
                                                 {"epochs": 5})]
    assert len(variants) == 4


def test_compare_recipes_under_each_swept_budget():
    variants = expand("seed", {"epochs": [5, 10]}, compare=["official"])
    assert [v.name for v in variants] == ["epochs=5", "epochs=10",
                                          "preset=official,epochs=5",
                                          "preset=official,epochs=10"]
    assert variants[3].overrides == {"epochs": 10}


def test_a_preset_identical_to_a_grid_variant_is_not_run_twice():
    assert expand("seed", {}, compare=["seed", "official"]) == [
        Variant("base", "seed", {}), Variant("preset=official", "official", {},
                                             baseline=True)]


def test_a_long_name_gets_a_short_distinct_folder():
    a = Variant("x" * 200 + "a", "seed")
    b = Variant("x" * 200 + "b", "seed")
    assert len(a.slug) < 120 and a.slug != b.slug


# --- the table ---------------------------------------------------------------------
def _history(points: list[tuple[float, float | None]], key: str = "val_knn_top1"):
    """Train-log records at cumulative training seconds, k-NN on some of them."""
    return [{"epoch": i + 1, "train_seconds": t, "images_seen": 100 * (i + 1),
             **({key: k} if k is not None else {})} for i, (t, k) in enumerate(points)]


def test_unit_summary_from_the_train_log():
    history = _history([(10.0, 40.0), (20.0, None), (30.0, 65.0), (40.0, 72.0)])
    u = unit_summary([], history, levels=(60.0, 70.0, 80.0))
    assert u["knn"] == 72.0 and u["split"] == "validation"
    assert u["time_to"] == {60.0: 30.0, 70.0: 40.0, 80.0: None}
    assert u["images_per_s"] == pytest.approx(400 / 40.0)
    assert u["train_seconds"] == 40.0
    assert u["curve"] == {"seconds": [10.0, 30.0, 40.0], "knn": [40.0, 65.0, 72.0]}


def test_unit_summary_prefers_the_rows_of_the_run():
    rows = [{"model": "dino-seed", "metric": "val_knn_top1", "value": 71.5},
            {"model": "dino-seed", "metric": "time_to_knn", "threshold": 60, "value": 12.5},
            {"model": "dino-seed", "metric": "time_to_knn", "threshold": 70, "value": None},
            {"model": "dino-seed", "metric": "train_seconds", "value": 21.0},
            {"model": "dino-seed", "metric": "images_per_s", "value": 9.5},
            {"model": "random-init", "metric": "val_knn_top1", "value": 50.0,
             "collapsed": False},
            {"model": "pixels", "metric": "knn_top1", "value": 96.0},  # a test score
            {"model": "dino-seed", "metric": "knn_top1", "value": 60.0, "collapsed": True,
             "collapse_reason": "teacher entropy near 0"}]
    u = unit_summary(rows, _history([(10.0, 65.0), (20.0, 75.0)]), levels=(60.0, 70.0))
    assert u["knn"] == 71.5
    assert u["time_to"] == {60.0: 12.5, 70.0: None}  # the rows, not the log's 10 and 20
    assert u["collapsed"] and u["collapse_reason"] == "teacher entropy near 0"
    assert (u["train_seconds"], u["images_per_s"]) == (21.0, 9.5)
    # References on the validation split only, like the DINO score.
    assert u["references"] == {"random-init": 50.0}


def test_unit_summary_from_an_older_log_uses_epoch_seconds_and_the_test_split():
    history = [{"seconds": 2.0, "images_per_s": 100.0},
               {"seconds": 3.0, "images_per_s": 200.0, "knn_top1": 55.0},
               {"seconds": 4.0, "images_per_s": 100.0, "knn_top1": 65.0}]
    rows = [{"model": "dino-seed", "metric": "knn_top1", "value": 64.0}]
    u = unit_summary(rows, history, levels=(60.0,))
    assert u["split"] == "test" and u["knn"] == 64.0
    assert u["curve"]["seconds"] == [5.0, 9.0]
    assert u["time_to"] == {60.0: 9.0}
    assert u["train_seconds"] == 9.0
    assert u["images_per_s"] == pytest.approx((200 + 600 + 400) / 9.0)


def _unit(knn, t60, t70, collapsed=""):
    return {"knn": knn, "split": "validation", "time_to": {60.0: t60, 70.0: t70},
            "collapsed": bool(collapsed), "collapse_reason": collapsed,
            "images_per_s": 100.0 + knn, "train_seconds": knn / 10,
            "references": {"random-init": knn - 20, "pixels": 90.0},
            "curve": {"seconds": [], "knn": []}}


def test_aggregate_median_spread_and_misses():
    units = [_unit(60.0, 10.0, None), _unit(70.0, None, None, "teacher entropy near 0"),
             _unit(65.0, 30.0, 20.0)]
    line = aggregate("digits", Variant("a", "seed").as_json(), units, levels=(60.0, 70.0))
    assert (line["knn_median"], line["knn_min"], line["knn_max"]) == (65.0, 60.0, 70.0)
    # 60%: 10, never, 30 -> never counts as slowest, the median is 30.
    assert line["time_to_knn"]["60"] == {"median_seconds": 30.0, "not_reached": 1}
    # 70%: two of three never -> the median is not reached.
    assert line["time_to_knn"]["70"] == {"median_seconds": None, "not_reached": 2}
    assert line["collapsed"] == 1 and line["collapse_reasons"] == ["teacher entropy near 0"]
    assert line["images_per_s"] == 165.0 and line["train_seconds"] == 6.5
    assert line["references"] == {"random-init": 45.0, "pixels": 90.0}
    md = markdown([line], {"digits": (60.0, 70.0)})
    assert "| `a` | 3 | 65.00 | 60.00–70.00 | 45.00 | 30.0 (1/3 not reached) | " \
           "not reached (2/3) | 1/3 (teacher entropy near 0) | 165 | 6.5 |" in md
    assert "(raw pixels: 90.00)" in md


def test_pixels_at_the_models_input_size_sit_beside_the_raw_pixels():
    """A run whose model reads its images resized carries a ``pixels-<size>px`` reference:
    the summary keeps it on the split the DINO score was read on, and the table's header
    names it beside the raw pixels."""
    rows = [{"model": "dino-seed", "metric": "val_knn_top1", "value": 95.0},
            {"model": "pixels", "metric": "val_knn_top1", "value": 95.5},
            {"model": "pixels-16px", "metric": "val_knn_top1", "value": 96.0},
            {"model": "pixels-16px", "metric": "knn_top1", "value": 95.9}]
    u = unit_summary(rows, [], levels=())
    assert u["references"] == {"pixels": 95.5, "pixels-16px": 96.0}
    units = [{**_unit(95.0, 10.0, 20.0), "references": {"pixels": 95.5, "pixels-16px": v}}
             for v in (95.0, 96.0, 96.5)]
    line = aggregate("mnist", Variant("a", "seed").as_json(), units, levels=(60.0,))
    assert line["references"]["pixels-16px"] == 96.0
    # A variant at another input size keeps its own reference: sizes are never merged,
    # and a variant at the stored size has none.
    other = aggregate("mnist", Variant("b", "seed").as_json(),
                      [{**_unit(94.0, 10.0, 20.0), "references": {"pixels": 95.5,
                                                                  "pixels-20px": 96.1}}],
                      levels=(60.0,))
    stored = aggregate("mnist", Variant("c", "seed").as_json(), [_unit(93.0, 10.0, 20.0)],
                       levels=(60.0,))
    md = markdown([line, other, stored], {"mnist": (60.0,)})
    assert ("(raw pixels: 95.50; pixels-16px, as the model reads them: 96.00; pixels-20px, "
            "as the model reads them: 96.10)") in md
    flat = list(csv.DictReader(io.StringIO(to_csv([line, other, stored], {"mnist": (60.0,)}))))
    assert [(f["pixels_input"], f["pixels_input_knn"]) for f in flat] == [
        ("pixels-16px", "96.0"), ("pixels-20px", "96.1"), ("", "")]
    # No resized reference: the lookup matches no row, not rows without a model.
    assert unit_summary([{"metric": "val_knn_top1", "value": 1.0}], [],
                        levels=())["references"] == {}


def test_unit_summary_records_the_size_of_the_scored_split():
    rows = [{"model": "dino-seed", "metric": "val_knn_top1", "value": 71.5, "n_val": 1000,
             "n_test": 10000}]
    assert unit_summary(rows, [], levels=())["n_eval"] == 1000
    rows = [{"model": "dino-seed", "metric": "knn_top1", "value": 64.0, "n_test": 500}]
    assert unit_summary(rows, [], levels=())["n_eval"] == 500
    older = [{"model": "dino-seed", "metric": "val_knn_top1", "value": 71.5}]
    assert unit_summary(older, [], levels=())["n_eval"] is None


def test_the_table_states_the_splits_sampling_error():
    units = [{**_unit(knn, 10.0, 20.0), "n_eval": 1000} for knn in (94.0, 95.0, 96.0)]
    line = aggregate("mnist", Variant("a", "seed").as_json(), units, levels=(60.0, 70.0))
    assert line["n_eval"] == 1000
    md = markdown([line], {"mnist": (60.0, 70.0)})
    # Worked by hand: sqrt(0.95 * 0.05 / 1000) = sqrt(4.75e-5) = 0.006892, 0.69 points.
    assert ("On these 1,000 images a score near the median (95.0%) carries a binomial "
            "standard error of 0.69 points.") in md
    # Runs that did not record the split's size: no claim.
    bare = aggregate("mnist", Variant("a", "seed").as_json(),
                     [_unit(knn, 10.0, 20.0) for knn in (94.0, 95.0, 96.0)], levels=(60.0,))
    assert "standard error" not in markdown([bare], {"mnist": (60.0,)})
    # Variants scored on different splits (an older test-split run beside a validation
    # one): no single split to speak of, so no claim.
    tested = aggregate("mnist", Variant("b", "seed").as_json(),
                       [{**_unit(95.0, 10.0, 20.0), "split": "test", "n_eval": 10000}],
                       levels=(60.0, 70.0))
    assert "standard error" not in markdown([line, tested], {"mnist": (60.0, 70.0)})


def test_aggregate_an_even_number_of_seeds():
    units = [_unit(60.0, 10.0, None), _unit(62.0, 20.0, 40.0)]
    line = aggregate("digits", Variant("a", "seed").as_json(), units, levels=(60.0, 70.0))
    assert line["knn_median"] == 61.0
    assert line["time_to_knn"]["60"]["median_seconds"] == 15.0
    assert line["time_to_knn"]["70"] == {"median_seconds": None, "not_reached": 1}


def test_lines_sort_by_median_knn_within_each_dataset():
    def line(dataset, name, knn):
        return {"dataset": dataset, "variant": name, "knn_median": knn}
    lines = [line("mnist", "a", 50.0), line("digits", "b", 40.0), line("mnist", "c", None),
             line("mnist", "d", 70.0), line("digits", "e", 45.0)]
    assert [s["variant"] for s in sort_lines(lines)] == ["d", "a", "c", "e", "b"]


# --- resume, with a stand-in for the per-variant run ----------------------------------
class FakeRuns:
    """Stands in for ``run_unit``: writes a finished run folder whose k-NN is set by the
    variant's teacher_temp, and can stop at a given call as a signal would."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[tuple[str, bool, bool]] = []
        self.stop_at = stop_at

    def __call__(self, run_opts, log):
        out = Path(run_opts.out)
        self.calls.append((out.parent.name + "/" + out.name, run_opts.resume,
                           run_opts.restart))
        if len(self.calls) == self.stop_at:
            atomic_write_text(out / "checkpoints" / "digits_seed0.pt", "state")
            raise RunInterrupted("stopped at epoch 1", 15)
        knn = 100 * run_opts.overrides.get("teacher_temp", 0.5) + run_opts.seeds[0]
        atomic_write_json(out / "results.json", {"meta": {}, "figures": {}, "rows": [
            {"dataset": "digits", "model": "dino-seed", "metric": "val_knn_top1",
             "value": knn, "collapsed": False, "collapse_reason": ""}]})
        log_lines = [{"epoch": 1, "train_seconds": 1.0, "val_knn_top1": knn - 5},
                     {"epoch": 2, "train_seconds": 2.0, "val_knn_top1": knn}]
        atomic_write_text(out / f"train_digits_seed{run_opts.seeds[0]}.jsonl",
                          "".join(json.dumps(h) + "\n" for h in log_lines))


def _options(out: Path, temps=(0.5, 0.7), seeds=(0, 1), **kw) -> SweepOptions:
    variants = expand("seed", {"depth": [1], "teacher_temp": list(temps)})
    return SweepOptions(variants=variants, seeds=list(seeds), out=out,
                        run={"datasets": ["digits"], "label_budgets": (),
                             "attention_images": 0, "probe": False}, **kw)


def test_an_interrupted_sweep_does_not_rerun_finished_runs(tmp_path, monkeypatch):
    out = tmp_path / "study"
    first = FakeRuns(stop_at=3)  # the first run of the second variant is stopped
    monkeypatch.setattr(sweep_module, "run_unit", first)
    with pytest.raises(RunInterrupted) as e:
        sweep(_options(out), log=lambda m: None)
    assert "teacher_temp=0.7, seed 0" in str(e.value) and "rerun the same" in str(e.value)
    assert e.value.signum == 15
    # What finished is already in the table.
    assert [s["variant"] for s in json.loads((out / "sweep.json").read_text())["table"]] \
        == ["teacher_temp=0.5"]

    again = FakeRuns()
    monkeypatch.setattr(sweep_module, "run_unit", again)
    lines = sweep(_options(out), log=lambda m: None)
    # Only the second variant runs: seed 0 resumes from its checkpoint, seed 1 starts.
    assert again.calls == [("teacher_temp=0.7/seed0", True, False),
                           ("teacher_temp=0.7/seed1", False, True)]
    assert [(s["variant"], s["knn_median"]) for s in lines] == [
        ("teacher_temp=0.7", 70.5), ("teacher_temp=0.5", 50.5)]

    done = FakeRuns()
    monkeypatch.setattr(sweep_module, "run_unit", done)
    sweep(_options(out, levels=(66.0, 75.0)), log=lambda m: None)  # re-tabulate only
    assert done.calls == []
    table = json.loads((out / "sweep.json").read_text())["table"]
    # teacher_temp=0.7 logs k-NN 65 then 70 (seed 0), 66 then 71 (seed 1) at 1 s and 2 s.
    assert table[0]["time_to_knn"] == {"66": {"median_seconds": 1.5, "not_reached": 0},
                                       "75": {"median_seconds": None, "not_reached": 2}}
    assert (out / "knn_vs_time.png").stat().st_size > 0
    with (out / "sweep.csv").open() as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["teacher_temp=0.7",
                                                            "teacher_temp=0.5"]


def test_a_run_finished_with_other_options_is_redone(tmp_path, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setattr(sweep_module, "run_unit", FakeRuns())
    sweep(_options(out, temps=(0.5,), seeds=(0,)), log=lambda m: None)
    marker = out / "variants" / "base" / "seed0" / "sweep_unit.json"
    saved = json.loads(marker.read_text())
    saved["options"]["knn_k"] = 5
    marker.write_text(json.dumps(saved))
    again = FakeRuns()
    monkeypatch.setattr(sweep_module, "run_unit", again)
    sweep(_options(out, temps=(0.5,), seeds=(0,)), log=lambda m: None)
    assert again.calls == [("base/seed0", False, True)]


def test_eval_feature_reaches_every_run_and_cls_keeps_older_sweeps_identity(tmp_path,
                                                                             monkeypatch):
    args = build_parser().parse_args(["sweep", "--eval-feature", "cls+patch-mean"])
    assert options_from_args(args).run["eval_feature"] == "cls+patch-mean"
    assert options_from_args(build_parser().parse_args(["sweep"])).run["eval_feature"] == "cls"
    # The default stays out of the identity, as in sweeps written before the option, so
    # their finished runs are reused; the other feature is a different sweep.
    out = tmp_path / "study"
    monkeypatch.setattr(sweep_module, "run_unit", FakeRuns())
    sweep(_options(out, temps=(0.5,), seeds=(0,)), log=lambda m: None)
    marker = out / "variants" / "base" / "seed0" / "sweep_unit.json"
    assert "eval_feature" not in json.loads(marker.read_text())["options"]
    assert "k-NN on the CLS token after the final norm." in (out / "sweep.md").read_text()
    patch_mean = _options(out, temps=(0.5,), seeds=(0,))
    patch_mean.run["eval_feature"] = "cls+patch-mean"
    with pytest.raises(UserError, match="options eval_feature"):
        sweep(patch_mean, log=lambda m: None)
    again = FakeRuns()
    monkeypatch.setattr(sweep_module, "run_unit", again)
    sweep(dataclasses.replace(patch_mean, restart=True), log=lambda m: None)
    assert again.calls == [("base/seed0", False, True)]
    assert "mean of the last block's patch tokens" in (out / "sweep.md").read_text()


def test_precision_reaches_every_run_and_auto_keeps_older_sweeps_identity(tmp_path,
                                                                         monkeypatch):
    args = build_parser().parse_args(["sweep", "--precision", "bf16"])
    assert options_from_args(args).run["precision"] == "bf16"
    out = tmp_path / "study"
    monkeypatch.setattr(sweep_module, "run_unit", FakeRuns())
    sweep(_options(out, temps=(0.5,), seeds=(0,)), log=lambda m: None)
    marker = out / "variants" / "base" / "seed0" / "sweep_unit.json"
    assert "precision" not in json.loads(marker.read_text())["options"]
    bf16 = _options(out, temps=(0.5,), seeds=(0,))
    bf16.run["precision"] = "bf16"  # a different computation: not the same sweep
    with pytest.raises(UserError, match="options precision"):
        sweep(bf16, log=lambda m: None)


def test_a_different_grid_is_refused_unless_restart(tmp_path, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setattr(sweep_module, "run_unit", FakeRuns())
    sweep(_options(out), log=lambda m: None)
    before = (out / "sweep.md").read_text()
    with pytest.raises(UserError) as e:
        sweep(_options(out, temps=(0.5, 0.9)), log=lambda m: None)
    assert "holds a different sweep" in str(e.value) and "--restart" in str(e.value)
    assert "teacher_temp=0.9" in str(e.value)
    assert (out / "sweep.md").read_text() == before
    with pytest.raises(UserError, match="seeds"):
        sweep(_options(out, seeds=(0, 1, 2)), log=lambda m: None)

    fresh = FakeRuns()
    monkeypatch.setattr(sweep_module, "run_unit", fresh)
    sweep(_options(out, temps=(0.5, 0.9), restart=True), log=lambda m: None)
    assert len(fresh.calls) == 4
    assert not (out / "variants" / "teacher_temp=0.7").exists()


def test_an_empty_grid_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the grid is empty"):
        sweep(SweepOptions(variants=[], out=tmp_path / "s"), log=lambda m: None)
    assert not (tmp_path / "s").exists()


# --- the command line --------------------------------------------------------------
BAD = [
    (["--teacher-temp"], "expected at least one argument"),
    (["--teacher-temp", "0.04", "-1"], "variant teacher_temp=-1.0: --teacher-temp must be "
                                       "positive"),
    (["--teacher-temp", "hot"], "--teacher-temp: 'hot' is not a number"),
    (["--global-scale", "0.4"], "--global-scale takes 2 numbers per value"),
    (["--out-dim", "256", "256"], "--out-dim repeats the value 256"),
    (["--head", "mlp"], "--head: 'mlp' is not one of seed, official"),
    (["--compare-recipes", "paper"], "invalid choice: 'paper'"),
    (["--eval-feature", "avg"], "invalid choice: 'avg'"),
    (["--budget-seconds", "0"], "--budget-seconds must be positive, got 0"),
    (["--budget-seconds", "-5"], "--budget-seconds must be positive, got -5"),
    (["--knn-levels", "0"], "--knn-levels are percentages in (0, 100]"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--datasets", "digitz"], "unknown dataset 'digitz'"),
    (["--batch-size", "64", "4096"], "variant batch_size=4096: --batch-size 4096 exceeds"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_exits_2_with_one_line(flags, expected, tmp_path, capsys):
    out = tmp_path / "study"
    assert _exit_code(["sweep", *flags, "--out", str(out)]) == 2
    assert expected in one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_help_explains_the_grid(capsys):
    assert _exit_code(["sweep", "--help"]) == 0
    text = capsys.readouterr().out
    for part in ("--global-scale 0.4,1.0 0.25,1.0", "--compare-recipes", "--budget-seconds",
                 "--restart", "knn_vs_time.png", "--teacher-temp"):
        assert part in text


# --- one real sweep ----------------------------------------------------------------
def test_a_small_real_sweep_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    argv = ["sweep", *TINY, "--epochs", "1", "--eval-every", "1", "--train-subset", "640",
            "--test-subset", "200", "--teacher-temp", "0.04", "0.07", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher_temp=0.07" in printed
    for name in ("teacher_temp=0.04", "teacher_temp=0.07"):
        run_dir = out / "variants" / name / "seed0"
        assert (run_dir / "results.json").exists()
        assert (run_dir / "train_digits_seed0.jsonl").read_text().count("\n") == 1
        assert list(run_dir.glob("curves_digits.png"))
        assert not list(run_dir.glob("attention_*.png"))
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["command"].startswith("dinobench ")
    table = manifest["table"]
    assert sorted(s["variant"] for s in table) == ["teacher_temp=0.04", "teacher_temp=0.07"]
    assert table[0]["knn_median"] >= table[1]["knn_median"]
    for s in table:
        assert 0 < s["knn_median"] <= 100 and s["train_seconds"] > 0
        assert s["images_per_s"] > 0 and s["seeds"] == 1
        assert s["knn_split"] == "validation"
        assert 0 < s["references"]["random-init"] <= 100
        assert set(s["time_to_knn"]) == {f"{lv:g}" for lv in manifest["levels"]["digits"]}
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert [r["variant"] for r in rows] == [s["variant"] for s in table]
    assert math.isclose(float(rows[0]["knn_median"]), table[0]["knn_median"])
    assert (out / "knn_vs_time.png").stat().st_size > 0

    def no_training(run_opts, log):
        raise AssertionError(f"{run_opts.out} was trained again")

    monkeypatch.setattr(sweep_module, "run_unit", no_training)
    assert main(argv) == 0  # the same command again: everything reused
    assert json.loads((out / "sweep.json").read_text())["table"] == table
