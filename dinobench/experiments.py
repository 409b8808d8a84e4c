"""The comparisons, as long-format rows and figure data.

Each function evaluates trained backbones on a :class:`Dataset` and returns rows (one per
dataset, model, metric: keys ``dataset``, ``model``, ``metric``, ``value`` plus the
caller's context and ``seed``, ``seconds``) and figure data made of plain lists, so
``report`` can redraw every table and figure from ``results.json`` alone.

Models: ``dino-<recipe>`` (the teacher), ``random-init`` (a ViT of the same shape, never
trained), ``pixels`` (the normalised raw pixels as features; k-NN and probe only;
``pixels-<size>px`` too, resized as the model's input, where the model reads another size),
``uniform`` (equal attention everywhere; overlap metrics only) and ``supervised`` (the
same ViT trained from scratch with labels only).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import input_pixels_name
from .curves import (  # noqa: F401 (re-exported: the comparisons' public names)
    dino_curve,
    dino_epoch_evaluator,
    supervised_curve,
    validation_split,
)
from .data.composites import BACKGROUNDS, SIZES, composite_dataset
from .data.registry import Dataset
from .dino.multicrop import MultiCropConfig
from .errors import DataError
from .eval.attention import (
    OVERLAP_METRICS,
    cls_attention_maps,
    overlap_scores,
    patch_foreground,
    uniform_overlap,
)
from .eval.features import extract_features
from .eval.knn import knn_top1
from .eval.linear_probe import DEFAULT_CS, linear_probe
from .eval.pixels import pixel_features
from .eval.supervised import SupervisedConfig, train_supervised
from .eval.time_to_accuracy import time_to_knn, training_scores
from .vit import ViT, ViTConfig

INK_DATASETS = ("mnist", "digits")  # grey digits on black: the ink is the object
BUDGETS = (0.01, 0.1, 1.0)  # fractions of the labelled split


@dataclass(frozen=True)
class EvalConfig:
    knn: tuple[tuple[int, float], ...] = ((20, 0.07), (200, 0.1))  # (k, temperature)
    probe: bool = True  # fit the linear probe (seconds to minutes on CPU)
    probe_cs: tuple[float, ...] = DEFAULT_CS  # C grid searched on held-out train images
    n_last_blocks: int = 1  # probe features: CLS of the last n blocks, concatenated
    # k-NN and probe features: CLS, plus the mean-pooled patch tokens when set.
    patch_mean: bool = False
    keep_mass: float = 0.6  # attention mass the mask keeps
    attention_images: int = 16  # test images in the attention figure (0: none)
    batch_size: int = 256  # images per forward pass


DEFAULT_EVAL = EvalConfig()
DEFAULT_SUPERVISED = SupervisedConfig()


def knn_metric(k: int, temperature: float) -> str:
    """``knn_top1`` for the headline setting (k 20, T 0.07), else ``knn_top1_k200_t0.1``."""
    return "knn_top1" if (k, temperature) == (20, 0.07) else f"knn_top1_k{k}_t{temperature:g}"


def foreground_masks(ds: Dataset) -> torch.Tensor | None:
    """Exact test-set pixel masks ``bool (N, H, W)``, or None when the dataset has none.

    Composites carry theirs; for grey digits on black (MNIST, scikit-learn digits) the
    digit is the only thing in the image, so its mask is the ink brighter than half.
    """
    masks = getattr(ds, "test_masks", None)
    if masks is not None:
        return masks
    if ds.name in INK_DATASETS:
        return ds.test_images.amax(dim=1) > 127
    return None


def random_init_like(cfg: ViTConfig, seed: int, device=None) -> ViT:
    """A ViT of the same shape, initialised from ``seed`` and never trained."""
    torch.manual_seed(seed)
    return ViT(cfg).to(device or "cpu").eval()


def budget_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded stratified subset: ``max(2, round(fraction * n_c))`` images of each class
    (capped at ``n_c``), so the probe can always hold out one image per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a label budget is a fraction in (0, 1], got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().squeeze(1)
        n = min(len(idx), max(2, round(fraction * len(idx))))
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    return torch.cat(picked).sort().values


def _rows(dataset: str, model: str, scores: list[dict], context: dict, seed: int,
          seconds: float) -> list[dict]:
    return [{"dataset": dataset, "model": model, "metric": s["metric"], "value": s["value"],
             **context, "seed": seed, "seconds": round(seconds, 3),
             **{k: v for k, v in s.items() if k not in ("metric", "value")}}
            for s in scores]


def training_rows(dataset: str, model: str, history: list[dict], *, context: dict,
                  seed: int, levels: tuple[float, ...] | None) -> list[dict]:
    """What training cost, from the trainer's records: ``train_seconds``,
    ``eval_seconds``, ``images_per_s``; and, for each validation k-NN level in ``levels``
    (%; None when nothing was evaluated during training), ``time_to_knn`` with
    ``threshold`` (the level), ``value`` (train seconds of the first evaluation at or
    above it, None if none was) and ``steps``."""
    scores = (time_to_knn(history, levels) if levels else []) + training_scores(history)
    return _rows(dataset, model, scores, context, seed, 0.0)


def _overlap_scores(summary: dict, keep_mass: float) -> list[dict]:
    if summary["n_scored"] == 0:
        return []  # no image has a foreground patch: nothing to score
    extra = {"keep_mass": keep_mass, "n_scored": summary["n_scored"],
             "n_images": summary["n_images"]}
    return [{"metric": m, "value": summary[m], **extra} for m in OVERLAP_METRICS]


def feature_scores(train: torch.Tensor, test: torch.Tensor, ds: Dataset,
                   cfg: EvalConfig = DEFAULT_EVAL, *, labelled: torch.Tensor | None = None,
                   val: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                   probe_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                   probe_extra: dict | None = None) -> list[dict]:
    """Scores of frozen train and test features: k-NN for every (k, T) in ``cfg.knn``
    (the whole train split is the bank); with ``val`` = (validation rows, bank rows),
    ``val_knn_top1`` at the first (k, T) (the measure training is followed by); the
    linear probe on ``labelled`` train rows (default all) of ``probe_features`` (default
    the same features) when ``cfg.probe``."""
    num_classes, labels = ds.spec.num_classes, ds.train_labels
    scores = [{"metric": knn_metric(k, t), "k": k, "temperature": t,
               "value": knn_top1(train, labels, test, ds.test_labels, k=k,
                                 temperature=t, num_classes=num_classes)}
              for k, t in cfg.knn]
    if val is not None:
        (k, t), (rows, bank) = cfg.knn[0], val
        scores.append({"metric": "val_knn_top1", "k": k, "temperature": t,
                       "n_val": len(rows),
                       "value": knn_top1(train[bank], labels[bank], train[rows],
                                         labels[rows], k=k, temperature=t,
                                         num_classes=num_classes)})
    if cfg.probe:
        train, test = probe_features or (train, test)
        idx = labelled if labelled is not None else torch.arange(len(labels))
        probe = linear_probe(train.cpu()[idx], labels[idx], test.cpu(),
                             ds.test_labels, Cs=cfg.probe_cs, seed=seed)
        scores.append({"metric": "linear_top1", "value": probe.top1, "C": probe.C,
                       "n_labels": len(idx), **(probe_extra or {}),
                       "converged": probe.converged})
    return scores


def evaluate_backbone(backbone: ViT, ds: Dataset, cfg: EvalConfig = DEFAULT_EVAL, *,
                      labelled: torch.Tensor | None = None, grid_masks: torch.Tensor | None
                      = None, val: tuple[torch.Tensor, torch.Tensor] | None = None,
                      seed: int = 0, device=None) -> tuple[list[dict], torch.Tensor]:
    """Scores of one backbone (:func:`feature_scores` of its frozen features: CLS, plus
    the mean-pooled patch tokens with ``cfg.patch_mean``) and the overlap scores when
    ``grid_masks`` (patch-level test foreground) are given.

    Returns ``[{"metric", "value", ...extras}]`` and the attention maps of the first
    ``cfg.attention_images`` test images ``(n, heads, gh, gw)``.
    """
    mean, std, bs = ds.spec.mean, ds.spec.std, cfg.batch_size
    kw = {"batch_size": bs, "device": device, "patch_mean": cfg.patch_mean}
    train = extract_features(backbone, ds.train_images, mean, std, **kw)
    test = extract_features(backbone, ds.test_images, mean, std, **kw)
    probe_features = None
    if cfg.probe and cfg.n_last_blocks != 1:
        probe_features = tuple(
            extract_features(backbone, x, mean, std, n_last_blocks=cfg.n_last_blocks, **kw)
            for x in (ds.train_images, ds.test_images))
    scores = feature_scores(train, test, ds, cfg, labelled=labelled, val=val, seed=seed,
                            probe_features=probe_features,
                            probe_extra={"n_last_blocks": cfg.n_last_blocks})
    n_maps = ds.test_images.shape[0] if grid_masks is not None else cfg.attention_images
    maps = cls_attention_maps(backbone, ds.test_images[:n_maps], mean, std,
                              batch_size=bs, device=device)
    if grid_masks is not None:
        scores += _overlap_scores(overlap_scores(maps, grid_masks, cfg.keep_mass).summary(),
                                  cfg.keep_mass)
    return scores, maps[:cfg.attention_images]


def evaluate_models(ds: Dataset, models: dict[str, ViT], *, seed: int, context: dict,
                    cfg: EvalConfig = DEFAULT_EVAL, labelled: torch.Tensor | None = None,
                    val: tuple[torch.Tensor, torch.Tensor] | None = None,
                    pixels: bool = True, attention: bool = True, device=None
                    ) -> tuple[list[dict], dict]:
    """Rows for every model in ``models`` (name -> backbone) on ``ds``; with ``pixels``,
    k-NN and probe rows of the raw-pixel reference ``pixels`` (and of
    ``pixels-<size>px`` where the models read the images resized); ``uniform`` overlap rows
    when the dataset has foreground masks; ``val_knn_top1`` rows when ``val`` (validation
    rows, bank rows) is given. Figure data ``{"attention": [...]}`` (one item per
    dataset: the images, each model's head-mean maps, and the patch foreground) when
    ``attention`` and ``cfg.attention_images > 0``."""
    masks = foreground_masks(ds)
    grid = next(iter(models.values())).cfg.grid
    grid_masks = patch_foreground(masks, grid) if masks is not None else None
    rows, maps = [], {}
    for name, backbone in models.items():
        t0 = time.perf_counter()
        scores, maps[name] = evaluate_backbone(backbone, ds, cfg, labelled=labelled,
                                               grid_masks=grid_masks, val=val, seed=seed,
                                               device=device)
        rows += _rows(ds.name, name, scores, context, seed, time.perf_counter() - t0)
    if pixels:
        dev = device or next(next(iter(models.values())).parameters()).device
        stored, model_side = ds.test_images.shape[-1], next(iter(models.values())).cfg.image_size
        sides = {"pixels": stored}
        if model_side < stored:  # shrunk; enlarged pixels add nothing a k-NN can read
            sides[input_pixels_name(model_side)] = model_side
        for name, side in sides.items():
            t0 = time.perf_counter()
            train, test = (pixel_features(x, ds.spec.mean, ds.spec.std, size=side, device=dev)
                           for x in (ds.train_images, ds.test_images))
            scores = feature_scores(train, test, ds, cfg, labelled=labelled, val=val,
                                    seed=seed)
            # The side the pixels were read at, where the context names the model's.
            where = {**context, "image_size": side} if "image_size" in context else context
            rows += _rows(ds.name, name, scores, where, seed, time.perf_counter() - t0)
    if grid_masks is not None:
        summary = uniform_overlap(grid_masks, cfg.keep_mass).summary()
        scores = _overlap_scores(summary, cfg.keep_mass)
        counts = {"n_scored": summary["n_scored"], "n_images": summary["n_images"]}
        if scores:
            scores.append({"metric": "fg_area", "value": summary["fg_area"], **counts})
        # The share of test images the overlap scores average over: those whose
        # foreground covers at least half of some patch (thin strokes on coarse grids
        # may cover none).
        scores.append({"metric": "fg_scored", **counts,
                       "value": 100.0 * summary["n_scored"] / max(summary["n_images"], 1)})
        rows += _rows(ds.name, "uniform", scores, context, seed, 0.0)
    figures: dict = {"attention": []}
    n = min(cfg.attention_images, ds.test_images.shape[0])
    if attention and n > 0:
        figures["attention"].append({
            "dataset": ds.name,
            "images": pack_uint8(ds.test_images[:n].permute(0, 2, 3, 1)),
            "maps": {name: _round(m.mean(1)) for name, m in maps.items()},
            "foreground": grid_masks[:n].int().tolist() if grid_masks is not None else None,
        })
    return rows, figures


def pack_uint8(images: torch.Tensor) -> dict:
    """``uint8`` images ``(N, H, W, C)`` as ``{"shape", "uint8_base64"}``: 4/3 byte per
    pixel value in results.json, where indented nested lists take about ten."""
    data = images.contiguous().cpu().numpy().tobytes()
    return {"shape": list(images.shape), "uint8_base64": base64.b64encode(data).decode()}


def _round(t: torch.Tensor, digits: int = 5) -> list:
    """A tensor as nested lists of rounded floats (compact, stable JSON)."""
    return torch.round(t.double(), decimals=digits).tolist()


def label_budget_comparison(ds: Dataset, teacher: ViT, *, model: str, crop_cfg:
                            MultiCropConfig, seed: int, context: dict,
                            budgets: tuple[float, ...] = BUDGETS,
                            sup_cfg: SupervisedConfig = DEFAULT_SUPERVISED,
                            cfg: EvalConfig = DEFAULT_EVAL, device=None,
                            log: Callable[[str], None] | None = None
                            ) -> tuple[list[dict], dict, ViT]:
    """Labels versus no labels at each budget (a fraction of the labelled train split):
    the DINO teacher probed linearly with the budget's labels against the same ViT trained
    from scratch on them. Rows: metric ``label_budget_top1`` with ``n_labels`` and
    ``budget``; figures: ``{"curves": [...]}`` (per-epoch supervised learning curves).
    Also returns the supervised backbone of the largest budget (for overlap rows)."""
    mean, std = ds.spec.mean, ds.spec.std
    device = device or next(teacher.parameters()).device  # train beside the teacher
    kw = {"batch_size": cfg.batch_size, "device": device, "n_last_blocks": cfg.n_last_blocks,
          "patch_mean": cfg.patch_mean}
    train = extract_features(teacher, ds.train_images, mean, std, **kw).cpu()
    test = extract_features(teacher, ds.test_images, mean, std, **kw).cpu()
    rows, curves, best = [], [], None
    for budget in sorted(budgets):
        idx = budget_indices(ds.train_labels, budget, seed)
        extra = {"n_labels": len(idx), "budget": budget}
        t0 = time.perf_counter()
        probe = linear_probe(train[idx], ds.train_labels[idx], test, ds.test_labels,
                             Cs=cfg.probe_cs, seed=seed)
        rows += _rows(ds.name, model, [{"metric": "label_budget_top1", "value": probe.top1,
                                        "C": probe.C, **extra}], context, seed,
                      time.perf_counter() - t0)
        sup = train_supervised(teacher.cfg, crop_cfg, ds.train_images[idx],
                               ds.train_labels[idx], ds.test_images, ds.test_labels,
                               num_classes=ds.spec.num_classes, cfg=sup_cfg,
                               device=device, seed=seed, log=log)
        sup_context = {**context, "epochs": sup_cfg.epochs, "n_train": len(idx)}
        rows += _rows(ds.name, "supervised", [{"metric": "label_budget_top1",
                                               "value": sup.test_top1, **extra}],
                      sup_context, seed, sup.seconds)
        curves.append(supervised_curve(ds.name, sup.history, len(idx), seed))
        best = sup.model.backbone
    return rows, {"curves": curves}, best


def composite_benchmark(train_fn: Callable[[Dataset, int], tuple[ViT, dict]], *,
                        data_dir, model: str, seeds: tuple[int, ...] = (0,),
                        backgrounds: tuple[str, ...] = BACKGROUNDS,
                        sizes: tuple[int, ...] = SIZES, n_train: int | None = None,
                        n_test: int | None = None, cfg: EvalConfig = DEFAULT_EVAL,
                        supervised_fn: Callable[[Dataset, int], ViT] | None = None,
                        device=None, log: Callable[[str], None] = print
                        ) -> tuple[list[dict], dict]:
    """Background x resolution with exact masks: for each composite dataset and seed,
    ``train_fn(ds, seed) -> (teacher backbone, row context)`` trains DINO, and the teacher
    is scored beside a random-init ViT, uniform attention and, when ``supervised_fn(ds,
    seed) -> backbone`` is given, the supervised ViT. Rows carry ``background`` and
    ``image_size``. A background whose data is missing (CIFAR-10) is skipped with a
    logged reason; a missing MNIST raises."""
    rows, figures = [], {"attention": []}
    for background in backgrounds:
        for size in sizes:
            try:
                ds = composite_dataset(background, size, data_dir=data_dir,
                                       n_train=n_train, n_test=n_test)
            except DataError as e:
                if background == "none":
                    raise
                log(f"skipping {background} backgrounds: {e}")
                break
            for seed in seeds:
                teacher, context = train_fn(ds, seed)
                dev = device or next(teacher.parameters()).device
                models = {model: teacher,
                          "random-init": random_init_like(teacher.cfg, seed, dev)}
                if supervised_fn is not None:
                    models["supervised"] = supervised_fn(ds, seed)
                context = {"n_train": len(ds.train_labels), **context,
                           "n_test": len(ds.test_labels), "background": background,
                           "image_size": size}
                r, f = evaluate_models(ds, models, seed=seed, context=context, cfg=cfg,
                                       attention=seed == seeds[0], device=dev)
                rows += r
                figures = merge_figures(figures, f)
    return rows, figures


def merge_figures(*parts: dict) -> dict:
    """Concatenate figure-data dicts key by key (lists of items)."""
    out: dict[str, list] = {}
    for part in parts:
        for key, items in part.items():
            out.setdefault(key, []).extend(items)
    return out
