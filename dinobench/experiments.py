"""The comparisons, as long-format rows and figure data.

Each function evaluates trained backbones on a :class:`Dataset` and returns rows (one per
dataset, model, metric: keys ``dataset``, ``model``, ``metric``, ``value`` plus the
caller's context and ``seed``, ``seconds``) and figure data made of plain lists, so
``report`` can redraw every table and figure from ``results.json`` alone.

Models: ``dino-<recipe>`` (the teacher), ``random-init`` (a ViT of the same shape, never
trained), ``uniform`` (equal attention everywhere; overlap metrics only) and
``supervised`` (the same ViT trained from scratch with labels only).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

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
from .eval.supervised import SupervisedConfig, train_supervised
from .vit import ViT, ViTConfig

INK_DATASETS = ("mnist", "digits")  # grey digits on black: the ink is the object
BUDGETS = (0.01, 0.1, 1.0)  # fractions of the labelled split


@dataclass(frozen=True)
class EvalConfig:
    knn: tuple[tuple[int, float], ...] = ((20, 0.07), (200, 0.1))  # (k, temperature)
    probe: bool = True  # fit the linear probe (seconds to minutes on CPU)
    probe_cs: tuple[float, ...] = DEFAULT_CS  # C grid searched on held-out train images
    n_last_blocks: int = 1  # probe features: CLS of the last n blocks, concatenated
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


def _overlap_scores(summary: dict, keep_mass: float) -> list[dict]:
    if summary["n_scored"] == 0:
        return []  # no image has a foreground patch: nothing to score
    extra = {"keep_mass": keep_mass, "n_scored": summary["n_scored"],
             "n_images": summary["n_images"]}
    return [{"metric": m, "value": summary[m], **extra} for m in OVERLAP_METRICS]


def evaluate_backbone(backbone: ViT, ds: Dataset, cfg: EvalConfig = DEFAULT_EVAL, *,
                      labelled: torch.Tensor | None = None, grid_masks: torch.Tensor | None
                      = None, seed: int = 0, device=None) -> tuple[list[dict], torch.Tensor]:
    """Scores of one backbone: k-NN for every (k, T) in ``cfg.knn`` (the whole train split
    is the bank), the linear probe (on ``labelled`` train indices; default all), and the
    overlap scores when ``grid_masks`` (patch-level test foreground) are given.

    Returns ``[{"metric", "value", ...extras}]`` and the attention maps of the first
    ``cfg.attention_images`` test images ``(n, heads, gh, gw)``.
    """
    mean, std, bs = ds.spec.mean, ds.spec.std, cfg.batch_size
    train = extract_features(backbone, ds.train_images, mean, std, batch_size=bs,
                             device=device)
    test = extract_features(backbone, ds.test_images, mean, std, batch_size=bs,
                            device=device)
    scores = [{"metric": knn_metric(k, t), "k": k, "temperature": t,
               "value": knn_top1(train, ds.train_labels, test, ds.test_labels, k=k,
                                 temperature=t, num_classes=ds.spec.num_classes)}
              for k, t in cfg.knn]
    if cfg.probe:
        if cfg.n_last_blocks != 1:
            train = extract_features(backbone, ds.train_images, mean, std, batch_size=bs,
                                     device=device, n_last_blocks=cfg.n_last_blocks)
            test = extract_features(backbone, ds.test_images, mean, std, batch_size=bs,
                                    device=device, n_last_blocks=cfg.n_last_blocks)
        idx = labelled if labelled is not None else torch.arange(len(ds.train_labels))
        probe = linear_probe(train.cpu()[idx], ds.train_labels[idx], test.cpu(),
                             ds.test_labels, Cs=cfg.probe_cs, seed=seed)
        scores.append({"metric": "linear_top1", "value": probe.top1, "C": probe.C,
                       "n_labels": len(idx), "n_last_blocks": cfg.n_last_blocks,
                       "converged": probe.converged})
    n_maps = ds.test_images.shape[0] if grid_masks is not None else cfg.attention_images
    maps = cls_attention_maps(backbone, ds.test_images[:n_maps], mean, std,
                              batch_size=bs, device=device)
    if grid_masks is not None:
        scores += _overlap_scores(overlap_scores(maps, grid_masks, cfg.keep_mass).summary(),
                                  cfg.keep_mass)
    return scores, maps[:cfg.attention_images]


def evaluate_models(ds: Dataset, models: dict[str, ViT], *, seed: int, context: dict,
                    cfg: EvalConfig = DEFAULT_EVAL, labelled: torch.Tensor | None = None,
                    attention: bool = True, device=None) -> tuple[list[dict], dict]:
    """Rows for every model in ``models`` (name -> backbone) on ``ds``, plus ``uniform``
    overlap rows when the dataset has foreground masks; figure data ``{"attention":
    [...]}`` (one item per dataset: the images, each model's head-mean maps, and the
    patch foreground) when ``attention`` and ``cfg.attention_images > 0``."""
    masks = foreground_masks(ds)
    grid = next(iter(models.values())).cfg.grid
    grid_masks = patch_foreground(masks, grid) if masks is not None else None
    rows, maps = [], {}
    for name, backbone in models.items():
        t0 = time.perf_counter()
        scores, maps[name] = evaluate_backbone(backbone, ds, cfg, labelled=labelled,
                                               grid_masks=grid_masks, seed=seed,
                                               device=device)
        rows += _rows(ds.name, name, scores, context, seed, time.perf_counter() - t0)
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
    kw = {"batch_size": cfg.batch_size, "device": device, "n_last_blocks": cfg.n_last_blocks}
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


def supervised_curve(dataset: str, history: list[dict], n_labels: int, seed: int) -> dict:
    return {"dataset": dataset, "model": "supervised", "seed": seed,
            "label": f"supervised, {n_labels} labels",
            "epoch": [h["epoch"] for h in history],
            "loss": [h["train_loss"] for h in history], "loss_name": "cross-entropy",
            "train_top1": [h["train_top1"] for h in history],
            "test_top1": [h["test_top1"] for h in history]}


def dino_curve(dataset: str, model: str, history: list[dict], seed: int) -> dict:
    """Learning curve of a DINO run from the trainer's per-epoch records (those written
    by :func:`dino_epoch_evaluator` carry the accuracies; other epochs hold None)."""
    return {"dataset": dataset, "model": model, "seed": seed, "label": f"{model} (no labels)",
            "epoch": [h["epoch"] for h in history],
            "loss": [h["loss"] for h in history], "loss_name": "DINO loss",
            "train_top1": [h.get("probe_train_top1") for h in history],
            "test_top1": [h.get("knn_top1") for h in history],
            "probe_top1": [h.get("probe_top1") for h in history]}


def dino_epoch_evaluator(ds: Dataset, *, every: int, epochs: int, cfg: EvalConfig =
                         DEFAULT_EVAL, labelled: torch.Tensor | None = None,
                         probe: bool = False, device=None, k: int = 20,
                         temperature: float = 0.07) -> Callable[[int, object], dict | None]:
    """``on_epoch_end`` hook for :class:`DINOTrainer`: every ``every`` epochs and at the
    last, k-NN top-1 of the teacher (``k``, ``temperature``), and with ``probe`` a linear
    probe on the ``labelled`` train images (one C = 1.0, to stay cheap; the final probe
    searches the grid) giving ``probe_train_top1`` and ``probe_top1``."""
    if every < 1:
        raise ValueError(f"--eval-every must be at least 1, got {every}")

    def evaluate(epoch: int, teacher) -> dict | None:
        if (epoch + 1) % every and epoch + 1 != epochs:
            return None
        backbone = getattr(teacher, "backbone", teacher)
        mean, std = ds.spec.mean, ds.spec.std
        train = extract_features(backbone, ds.train_images, mean, std,
                                 batch_size=cfg.batch_size, device=device)
        test = extract_features(backbone, ds.test_images, mean, std,
                                batch_size=cfg.batch_size, device=device)
        out = {"knn_top1": knn_top1(train, ds.train_labels, test, ds.test_labels, k=k,
                                    temperature=temperature, num_classes=ds.spec.num_classes)}
        if probe:
            idx = labelled if labelled is not None else torch.arange(len(ds.train_labels))
            p = linear_probe(train.cpu()[idx], ds.train_labels[idx], test.cpu(),
                             ds.test_labels, Cs=(1.0,))
            out.update(probe_train_top1=p.train_top1, probe_top1=p.top1)
        return out

    return evaluate


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
