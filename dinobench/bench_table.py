"""The ``dinobench bench`` result as a Markdown table, and where its JSON goes."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .io import atomic_write_json

EPOCH_IMAGES = 50_000  # a CIFAR-10 epoch


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def format_table(r: dict) -> str:
    """The result as a two-column Markdown table."""
    v = r["vit"]
    rows = [
        ("card", r["card"]), ("torch / CUDA", f"{r['torch']} / {r['cuda']}"),
        ("shapes", f"{r['dataset_shape']}: {r['global_crops'][0]} x {r['global_crops'][1]} px "
                   f"+ {r['local_crops'][0]} x {r['local_crops'][1]} px crops, "
                   f"{r['channels']} ch, {r['grid']}x{r['grid']} patches of {r['patch_size']} px"),
        ("model", f"ViT depth {v['depth']}, dim {v['dim']}, heads {v['heads']}, MLP "
                  f"{v['mlp_dim']}; {r['head']} head, K = {r['out_dim']}"),
        ("batch", f"{r['batch_size']}"), ("autocast", r["autocast"]),
        ("torch.compile", r["compile"]),
        ("first step (compilation included)", f"{r['first_step_seconds']:,.2f} s"),
        ("compilation (warm-up beyond its steps)", f"{r['compile_seconds']:,.2f} s"),
        ("images/s", f"{r['images_per_s']:,.1f} ± {r['images_per_s_std']:,.1f} "
                     f"({r['options']['repeats']} repeats of {r['options']['steps']} steps)"),
        ("step time", f"{r['step_ms']:,.2f} ms"),
        (f"epoch of {EPOCH_IMAGES:,} images", f"{r['epoch_seconds']:,.2f} s"),
        ("FLOP per image (counted)", f"{_si(r['flop_per_image'])} (formula "
         f"{_si(r['flop_per_image_formula'])}, ratio {r['flop_counted_over_formula']:.4f})"),
        ("achieved", _si(r["achieved_flop_per_s"], "FLOP/s")),
        (f"peak ({r['matmul_peak_kind']})", _si(r["matmul_peak_flop_per_s"], "FLOP/s")),
        ("MFU", f"{100 * r['mfu']:.2f}%"),
        (f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
    ]
    if "reference" in r:
        ref = r["reference"]
        rows += [("reference images/s", f"{ref['images_per_s']:,.1f} ± "
                  f"{ref['images_per_s_std']:,.1f} (PIL multi-crop in {ref['workers']} "
                  f"workers, prefetch {ref['prefetch_factor']}, {ref['attention']} "
                  f"attention, autocast {ref['autocast']})"),
                 ("reference model step alone", f"{ref['model_step_images_per_s']:,.1f} "
                  "images/s (fixed crops, no loader)")]
        if "loader_images_per_s" in ref:
            rows.append(("reference loader alone", f"{ref['loader_images_per_s']:,.1f} "
                         "images/s"))
        rows.append(("speed-up (same run, same device)", f"{r['speedup']:.2f}x"))
    if "knn" in r:
        k = r["knn"]
        rows.append((f"k-NN eval {k['n_train']:,} x {k['n_test']:,} (features included)",
                     f"{k['seconds']:.3f} s"))
    return "\n".join(["| quantity | value |", "|---|---|"]
                     + [f"| {a} | {b} |" for a, b in rows])


def result_path(options: dict, out: str | Path) -> Path:
    """``out/bench-<shape>-<recipe>-b<batch>-<device>-<time>.json``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dev = torch.device(options["device"]).type
    return Path(out) / (f"bench-{options['dataset_shape']}-{options['recipe']}-"
                        f"b{options['batch_size']}-{dev}-{stamp}.json")


def write_result(result: dict, out: str | Path) -> Path:
    path = result_path(result["options"], out)
    atomic_write_json(path, result)
    return path
