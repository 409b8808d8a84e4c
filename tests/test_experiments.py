"""experiments.py end to end on tiny data: rows, every table and figure, and a report
rebuilt from results.json alone with byte-identical tables."""

import contextlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinobench.figures as figures_module
from dinobench.config import SEED
from dinobench.data import load_dataset
from dinobench.data.composites import composite_dataset
from dinobench.data.registry import Dataset, DatasetSpec
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.eval.attention import cls_attention_maps, overlap_scores, patch_foreground
from dinobench.eval.features import extract_features
from dinobench.eval.knn import knn_top1
from dinobench.eval.supervised import SupervisedConfig
from dinobench.experiments import (
    EvalConfig,
    budget_indices,
    composite_benchmark,
    dino_curve,
    dino_epoch_evaluator,
    evaluate_models,
    foreground_masks,
    knn_metric,
    label_budget_comparison,
    merge_figures,
    random_init_like,
    training_rows,
    validation_split,
)
from dinobench.figures import uint8_images
from dinobench.report import rebuild, to_markdown, write_index, write_results
from dinobench.vit import ViTConfig
from helpers import REAL_DATA

EVAL = EvalConfig(probe_cs=(0.1, 1.0), batch_size=128)


def subset(ds: Dataset, n_train: int, n_test: int) -> Dataset:
    return Dataset(ds.spec, ds.train_images[:n_train], ds.train_labels[:n_train],
                   ds.test_images[:n_test], ds.test_labels[:n_test], source=ds.source)


def tiny_vit(ds: Dataset) -> ViTConfig:
    return ViTConfig(image_size=ds.spec.image_size, grid=ds.spec.grid,
                     in_chans=ds.spec.channels, dim=16, depth=2, heads=2, mlp_dim=32)


def test_budget_indices_are_stratified_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3)
    idx = budget_indices(labels, 0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]  # at least 2 per class
    assert torch.equal(idx, budget_indices(labels, 0.1, seed=0))
    assert not torch.equal(idx, budget_indices(labels, 0.1, seed=1))
    assert torch.equal(budget_indices(labels, 1.0, seed=3), torch.arange(83))
    with pytest.raises(ValueError, match="fraction"):
        budget_indices(labels, 0.0, seed=0)


def test_metric_names_and_foreground_sources():
    assert knn_metric(20, 0.07) == "knn_top1"
    assert knn_metric(200, 0.1) == "knn_top1_k200_t0.1"
    ds = subset(load_dataset("digits"), 10, 6)
    assert torch.equal(foreground_masks(ds), ds.test_images[:, 0] > 127)
    spec = DatasetSpec("photos", 32, 8, 3, (0.5,) * 3, (0.2,) * 3, ("a", "b"), 1)
    assert foreground_masks(Dataset(spec, ds.train_images, ds.train_labels,
                                    ds.test_images, ds.test_labels)) is None


def test_evaluate_models_agrees_with_the_pieces():
    ds = subset(load_dataset("digits"), 200, 60)
    cfg = tiny_vit(ds)
    a, b = random_init_like(cfg, 0), random_init_like(cfg, 1)
    rows, figs = evaluate_models(ds, {"a": a, "b": b}, seed=0, context={"recipe": "x"},
                                 cfg=EVAL)
    got = {(r["model"], r["metric"]): r for r in rows}
    mean, std = ds.spec.mean, ds.spec.std
    train = extract_features(a, ds.train_images, mean, std)
    test = extract_features(a, ds.test_images, mean, std)
    assert got["a", "knn_top1"]["value"] == knn_top1(train, ds.train_labels, test,
                                                     ds.test_labels, num_classes=10)
    assert got["a", "knn_top1_k200_t0.1"]["k"] == 200
    fg = patch_foreground(ds.test_images[:, 0] > 127, cfg.grid)
    expect = overlap_scores(cls_attention_maps(a, ds.test_images, mean, std), fg).summary()
    for m in ("jaccard_best_head", "jaccard_mean_head", "mass_inside", "pointing_game"):
        assert got["a", m]["value"] == pytest.approx(expect[m])
        assert got["a", m]["n_scored"] == expect["n_scored"]
    # Uniform attention's mass inside is the foreground's area fraction.
    assert got["uniform", "mass_inside"]["value"] == pytest.approx(
        got["uniform", "fg_area"]["value"])
    assert got["b", "linear_top1"]["n_labels"] == 200
    assert all(r["recipe"] == "x" and r["dataset"] == "digits" for r in rows)
    item = figs["attention"][0]
    assert list(item["maps"]) == ["a", "b"] and item["images"]["shape"] == [16, 32, 32, 1]
    assert torch.equal(torch.from_numpy(uint8_images(item["images"]).copy()),
                       ds.test_images[:16].permute(0, 2, 3, 1))
    json.dumps(rows), json.dumps(figs)  # plain data only


def write_tiny_mnist_npz(folder: Path) -> None:
    """Digit-like tiles from scikit-learn's digits in the Keras layout (no download)."""
    ds = load_dataset("digits")
    tiles = F.interpolate(ds.train_images[:, :, 2:30, 2:30].float(), size=(28, 28))
    x = tiles[:, 0].round().to(torch.uint8).numpy()
    y = ds.train_labels.numpy()
    np.savez(folder / "mnist.npz", x_train=x[:60], y_train=y[:60], x_test=x[60:90],
             y_test=y[60:90])


def run_pipeline(ds: Dataset, data_dir: Path, out: Path, backgrounds, sizes, n_comp):
    """Everything a run writes, at toy scale: DINO with per-epoch k-NN, labels versus no
    labels, overlap beside its references, and the composite benchmark."""
    cfg = tiny_vit(ds)
    recipe = SEED.replace(dim=16, depth=2, heads=2, mlp_dim=32, out_dim=16, epochs=2,
                          batch_size=min(128, len(ds.train_labels)), n_local=2,
                          warmup_epochs=0)
    crop = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size,
                                       ds.spec.mean, ds.spec.std)
    val = validation_split(ds)
    hook = dino_epoch_evaluator(ds, every=1, epochs=2, val=val, cfg=EVAL, probe=True)
    trainer = DINOTrainer(recipe, cfg, crop, seed=0, progress=False, log=lambda s: None,
                          on_epoch_end=hook, log_path=out / "train.jsonl")
    teacher = trainer.fit(ds.pretrain_images).teacher.backbone
    context = {"recipe": "seed", "epochs": 2, "n_train": len(ds.train_labels),
               "device": "cpu"}
    sup = SupervisedConfig(epochs=2, batch_size=64, warmup_epochs=0, eval_every=1)
    rows, f_budget, supervised = label_budget_comparison(
        ds, teacher, model="dino-seed", crop_cfg=crop, seed=0, context=context,
        budgets=(0.3, 1.0), sup_cfg=sup, cfg=EVAL)
    models = {"dino-seed": teacher, "random-init": random_init_like(cfg, 0),
              "supervised": supervised}
    r, f_eval = evaluate_models(ds, models, seed=0, context=context, cfg=EVAL, val=val)
    r += training_rows(ds.name, "dino-seed", trainer.history, context=context, seed=0,
                       levels=(10.0, 99.9))
    logged = []

    def train_fn(comp: Dataset, seed: int):  # untrained teachers keep the test fast
        return random_init_like(tiny_vit(comp), seed + 7), {"recipe": "seed", "epochs": 0}

    r_comp, f_comp = composite_benchmark(
        train_fn, data_dir=data_dir, model="dino-seed", backgrounds=backgrounds,
        sizes=sizes, n_train=n_comp[0], n_test=n_comp[1],
        cfg=EvalConfig(probe=False, batch_size=128), log=logged.append,
        supervised_fn=lambda comp, seed: random_init_like(tiny_vit(comp), seed + 9))
    curves = {"curves": [dino_curve(ds.name, "dino-seed", trainer_history(out), 0)]}
    figures = merge_figures(f_eval, f_budget, curves, f_comp)
    write_results(out, rows + r + r_comp, {"command": "test"}, figures)
    return rows + r + r_comp, logged


def trainer_history(out: Path) -> list[dict]:
    """The per-epoch records, read back from the JSONL log the trainer keeps."""
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def expected_cell(rows: list[dict], dataset: str, model: str, metric: str) -> str:
    """A table cell as docs/metrics describe it, from the result rows themselves: the
    mean over the seeds measured, two decimals, "± sample std" beside it for more than
    one seed; a collapsed seed is left out; "—" where no row is."""
    mine = [r for r in rows if (r["dataset"], r["model"], r["metric"]) == (dataset, model,
                                                                           metric)]
    values = [r["value"] for r in mine if not r.get("collapsed")]
    if not values:
        return f"collapsed ({len(mine)})" if mine else "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def md_table(md: str, title: str) -> list[dict]:
    """The table under the ``## title...`` heading: one dict per line, keyed by header."""
    section = md.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    header = cells(lines[0])
    return [dict(zip(header, cells(ln), strict=True)) for ln in lines[2:]]


@contextlib.contextmanager
def saved_figures():
    """Every figure the figure functions save, by file name, its artists kept for
    reading after it is closed."""
    saved, real = {}, figures_module._save

    def keep(fig, path):
        saved[Path(path).name] = fig
        real(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures_module, "_save", keep)
        yield saved


def check_tables(md: str, data: dict, history: list[dict], dataset: str) -> None:
    """results.md against results.json's rows and the training log, cell by cell."""
    rows = data["rows"]
    columns = {"k-NN (k 20)": "knn_top1", "k-NN (k 200)": "knn_top1_k200_t0.1",
               "linear": "linear_top1", "mass inside": "mass_inside"}
    summary = md_table(md, "Summary")
    pairs = {(r["dataset"], r["model"]) for r in rows if r["metric"] == "knn_top1"}
    assert pairs <= {(line["dataset"], line["model"]) for line in summary}
    for line in summary:
        for header, metric in columns.items():
            assert line[header] == expected_cell(rows, line["dataset"], line["model"],
                                                 metric), (line, header)
    dino = next(line for line in summary if (line["dataset"], line["model"]) ==
                (dataset, "dino-seed"))
    assert dino["k-NN (k 20)"] != "—"
    first = next(r for r in rows if (r["dataset"], r["model"], r["metric"]) ==
                 (dataset, "dino-seed", "knn_top1"))
    assert (f"| {dataset} | dino-seed | knn_top1 | "
            f"{expected_cell(rows, dataset, 'dino-seed', 'knn_top1')}% | 1 | "
            f"{first['epochs']} | {first['n_train']} |") in md.split("## All rows")[1]
    # The time table's last columns are the training log's final record.
    timed = next(line for line in md_table(md, "Time to validation k-NN")
                 if (line["dataset"], line["model"]) == (dataset, "dino-seed"))
    assert timed["final val k-NN (%)"] == f"{history[-1]['val_knn_top1']:.2f}"
    assert timed["train s"] == f"{history[-1]['train_seconds']:.2f}"


def check_knn_time_figure(fig, data: dict, history: list[dict], dataset: str) -> None:
    """The k-NN versus time panel plots the training log's records and, dashed, the
    references' final validation k-NN from the rows."""
    ax = fig.axes[0]
    assert ax.get_title() == dataset
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    dino = lines["dino-seed, seed 0"]
    assert list(dino.get_xdata()) == [h["train_seconds"] for h in history]
    assert list(dino.get_ydata()) == [h["val_knn_top1"] for h in history]
    for model in ("random-init", "pixels"):
        value = next(r["value"] for r in data["rows"] if (r["dataset"], r["model"],
                     r["metric"]) == (dataset, model, "val_knn_top1"))
        assert list(lines[f"{model} (reference)"].get_ydata()) == [value, value]
    levels = {ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"}
    curve = next(c for c in data["figures"]["curves"] if c["model"] == "dino-seed")
    assert levels == set(curve["levels"]) and levels
    assert {label for label in lines if not label.startswith("_")} == {
        "dino-seed, seed 0", "random-init (reference)", "pixels (reference)"}


def check_outputs(out: Path, rows: list[dict], datasets: list[str]) -> None:
    history = trainer_history(out)
    assert [h["epoch"] for h in history] == [1, 2]
    # Training is measured on the validation subset only: no test-split key per epoch.
    assert all("val_knn_top1" in h and "val_probe_top1" in h and "knn_top1" not in h
               and "probe_top1" not in h for h in history)
    models = {r["model"] for r in rows}
    assert {"dino-seed", "random-init", "pixels", "uniform", "supervised"} <= models
    metrics = {r["metric"] for r in rows}
    assert {"knn_top1", "knn_top1_k200_t0.1", "val_knn_top1", "linear_top1",
            "label_budget_top1", "jaccard_best_head", "jaccard_mean_head", "mass_inside",
            "pointing_game", "fg_area", "fg_scored", "time_to_knn", "train_seconds"} <= metrics
    # The final evaluation's validation k-NN of the teacher is the last epoch's.
    final = next(r["value"] for r in rows if r["model"] == "dino-seed"
                 and r["metric"] == "val_knn_top1" and r["dataset"] == datasets[0])
    assert final == history[-1]["val_knn_top1"]
    md = (out / "results.md").read_text()
    for title in ("## Summary", "## Time to validation k-NN", "## Labels versus no labels",
                  "## Background and resolution: jaccard_best_head", "## All rows"):
        assert title in md
    assert "not reached" in md  # the 99.9% level
    figures = ["curves_" + datasets[0], "label_budget_" + datasets[0],
               "overlap_" + datasets[0], "composites", "knn_vs_time"] + [
        f"attention_{d}" for d in datasets]
    paths = [out / f"{name}.png" for name in figures]
    assert all(p.stat().st_size > 1000 for p in paths)
    # The report rebuilds the same tables (byte for byte) and every figure from the JSON.
    tables = {name: (out / name).read_bytes() for name in ("results.md", "results.csv")}
    for p in paths + [out / "results.md", out / "results.csv"]:
        p.unlink()
    with saved_figures() as drawn:
        rebuild(out)
    data = json.loads((out / "results.json").read_text())
    check_tables(md, data, history, datasets[0])
    check_knn_time_figure(drawn["knn_vs_time.png"], data, history, datasets[0])
    assert {name: (out / name).read_bytes() for name in tables} == tables
    assert all(p.is_file() for p in paths)
    index = write_index(out.parent)
    assert f"| {out.name} | {datasets[0]} | dino-seed |" in index


def test_pipeline_writes_every_table_and_figure_and_rebuilds(tmp_path):
    write_tiny_mnist_npz(tmp_path)
    ds = subset(load_dataset("digits"), 192, 64)
    out = tmp_path / "run"
    rows, logged = run_pipeline(ds, tmp_path, out, ("none", "cifar10", "natural"),
                                (16, 32), (24, 16))
    assert any("skipping cifar10" in m and "cifar10.npz" in m for m in logged)
    comp = {(r["background"], r["image_size"]) for r in rows if "background" in r}
    assert comp == {("none", 16), ("none", 32), ("natural", 16), ("natural", 32)}
    comp_models = {r["model"] for r in rows if "background" in r}
    assert comp_models == {"dino-seed", "random-init", "pixels", "uniform", "supervised"}
    check_outputs(out, rows, ["digits", "mnist-none-16", "mnist-natural-32"])


def mnist_dataset(n_train: int, n_test: int) -> Dataset:
    """Real MNIST as the seed ran it: padded to 32x32, a 4x4 grid of 8-px patches."""
    data = np.load(REAL_DATA / "mnist.npz")
    pad = lambda x: F.pad(torch.from_numpy(x)[:, None], (2, 2, 2, 2))  # (N, 1, 32, 32)
    spec = DatasetSpec("mnist", 32, 4, 1, (0.1,), (0.29,), tuple("0123456789"), 200)
    return Dataset(spec, pad(data["x_train"][:n_train]),
                   torch.from_numpy(data["y_train"][:n_train]).long(),
                   pad(data["x_test"][:n_test]),
                   torch.from_numpy(data["y_test"][:n_test]).long(), source="mnist.npz")


@pytest.mark.real_data
def test_real_mnist_pipeline(tmp_path):
    if not (REAL_DATA / "mnist.npz").is_file():
        pytest.skip(f"real MNIST absent: {REAL_DATA / 'mnist.npz'}")
    backgrounds = ("none", "cifar10", "natural") if (REAL_DATA / "cifar10.npz").is_file() \
        else ("none", "natural")
    out = tmp_path / "mnist-run"
    rows, _ = run_pipeline(mnist_dataset(500, 200), REAL_DATA, out, backgrounds, (32,), (64, 32))
    check_outputs(out, rows, ["mnist"] + [f"mnist-{b}-32" for b in backgrounds])
    ds = composite_dataset("none", 32, data_dir=REAL_DATA, n_train=1, n_test=32)
    assert torch.equal(foreground_masks(ds), ds.test_masks)


def test_knn_only_rows_keep_the_plain_table_and_single_model_figures(tmp_path):
    rows = [{"dataset": "digits", "model": m, "metric": "knn_top1", "value": v, "seed": s,
             "epochs": 6, "n_train": 1347} for m, v, s in (("dino-seed", 90.0, 0),
                                                           ("dino-seed", 92.0, 1),
                                                           ("random-init", 40.0, 0))]
    figures = {"attention": [{"dataset": "digits", "model": "dino-seed",
                              "images": torch.zeros(4, 8, 8, 1, dtype=torch.uint8).tolist(),
                              "maps": torch.full((4, 2, 2), 0.25).tolist()}]}
    md = write_results(tmp_path, rows, {}, figures)
    assert md.splitlines()[:2] == ["| dataset | model | metric | value | seeds | epochs | "
                                   "n_train |", "|---|---|---|---:|---:|---:|---:|"]
    # Mean and sample standard deviation over the two seeds: 91 ± sqrt(2).
    assert "| digits | dino-seed | knn_top1 | 91.00 ± 1.41% | 2 | 6 | 1347 |" in md
    assert (tmp_path / "attention_digits_dino-seed.png").is_file()
    assert rebuild(tmp_path) == md


def test_summary_puts_dino_beside_its_references_in_column_order():
    def row(model, metric, value, seed=0, **extra):
        return {"dataset": "d", "model": model, "metric": metric, "value": value,
                "seed": seed, **extra}

    rows = [row("supervised", "label_budget_top1", 50.0, n_labels=10),
            row("dino-x", "label_budget_top1", 60.0, n_labels=10),
            row("uniform", "mass_inside", 12.0), row("random-init", "knn_top1", 30.0),
            row("dino-x", "knn_top1", 70.0), row("dino-x", "knn_top1", 80.0, seed=1),
            row("random-init", "linear_top1", 35.0)]
    md = to_markdown(rows)
    summary = md.split("## Labels")[0].splitlines()
    assert summary[2] == ("| dataset | model | k-NN (k 20) | linear | mass inside |")
    assert summary[4:8] == ["| d | dino-x | 75.00 ± 7.07 | — | — |",
                            "| d | random-init | 30.00 | 35.00 | — |",
                            "| d | uniform | — | — | 12.00 |", ""]
    assert "| dataset | labels | dino-x | supervised |\n|---|---|---:|---:|\n" \
           "| d | 10 | 60.00 | 50.00 |" in md
