"""``dinobench bench``: how fast is the whole DINO training step on this machine?

Times :meth:`DINOTrainer.step` (device multi-crop, student forward/backward, teacher
forward, optimizer, EMA, centering) on synthetic ``uint8`` images resident on the device,
after warm-up: CUDA events on a GPU, ``time.perf_counter`` on a CPU; mean and spread over
repeats. FLOPs are counted from the model with ``torch.utils.flop_counter`` and checked
against :func:`step_flops_formula`; MFU is read against a matmul peak measured in the same
run. ``--compare`` times the reference pipeline (:mod:`dinobench.reference`) in the same
process on the same device and prints the speed-up as a ratio. ``--knn`` times k-NN
evaluation, feature extraction included. One JSON file per run goes to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import get_recipe
from .data.registry import SPECS, DatasetSpec
from .devices import resolve_device
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer
from .errors import ConfigError, UserError
from .io import atomic_write_json
from .perf import (
    Timer,
    count_step_flops,
    environment,
    knn_seconds,
    matmul_peak,
    mean_std,
    peak_memory,
    profile_table,
    step_flops_formula,
    time_repeats,
)
from .vit import ViTConfig

# The seed's three datasets, from the registry: image side, patch grid, channels and the
# normalisation statistics. Local crops keep the patch size and half the side.
SHAPES = {name: SPECS[name] for name in ("mnist", "cifar10", "stl10")}
EPOCH_IMAGES = 50_000  # a CIFAR-10 epoch


@dataclass
class BenchOptions:
    device: str | None = None  # None: cuda if available, else cpu
    dataset_shape: str = "cifar10"
    recipe: str = "seed"
    batch_size: int | None = None  # None: 256 on CUDA, 16 on a CPU
    steps: int | None = None  # timed steps per repeat; None: 50 on CUDA, 3 on a CPU
    warmup: int | None = None  # untimed steps first (compilation); None: 10 / 1
    repeats: int = 3
    depth: int | None = None  # None: the recipe's (12)
    compile: bool | None = None  # None: on CUDA only
    compile_mode: str = "default"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on a CPU; or bf16 / fp32
    compare: bool = False
    reference_workers: int | None = None  # None: min(16, CPU count)
    reference_loader: bool = True  # also time the reference loader alone
    knn: bool = False
    knn_train: int | None = None  # None: 50,000 on CUDA, 1,000 on a CPU
    knn_test: int | None = None  # None: 10,000 / 250
    profile: int = 0  # steps under torch.profiler (0: none)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    seed: int = 0
    out: str | Path = "results/bench"

    def resolved(self) -> BenchOptions:
        """Fill device-dependent defaults and check every value."""
        dev = resolve_device(self.device)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32, got {self.precision}")
        if self.dataset_shape not in SHAPES:
            raise ConfigError(f"--dataset-shape must be one of {', '.join(SHAPES)}")
        cuda = dev.type == "cuda"
        o = BenchOptions(**{**self.__dict__, "device": str(dev), "out": str(self.out)})
        for name, gpu, cpu in (("batch_size", 256, 16), ("steps", 50, 3), ("warmup", 10, 1),
                               ("compile", True, False), ("knn_train", 50_000, 1_000),
                               ("knn_test", 10_000, 250),
                               ("reference_workers", min(16, os.cpu_count() or 1), None)):
            if getattr(o, name) is None:
                setattr(o, name, gpu if cuda else (cpu if cpu is not None else gpu))
        for name, low in (("batch_size", 1), ("steps", 1), ("repeats", 1), ("knn_train", 1),
                          ("knn_test", 1), ("threads", 1), ("depth", 1), ("warmup", 0),
                          ("reference_workers", 0), ("profile", 0)):
            v = getattr(o, name)
            if v is not None and v < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
        return o


def build(o: BenchOptions) -> tuple[DINOTrainer, torch.Tensor, DatasetSpec, MultiCropConfig]:
    """The trainer of the chosen recipe and shape, and a pool of synthetic ``uint8`` images
    (four batches) on the device."""
    shape = SHAPES[o.dataset_shape]
    changes = {"batch_size": o.batch_size}
    if o.depth is not None:
        changes["depth"] = o.depth
    recipe = get_recipe(o.recipe).replace(**changes).validate()
    cfg = ViTConfig(image_size=shape.image_size, grid=shape.grid, in_chans=shape.channels,
                    dim=recipe.dim, depth=recipe.depth, heads=recipe.heads,
                    mlp_dim=recipe.mlp_dim)
    crop = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size, shape.mean,
                                       shape.std)
    trainer = DINOTrainer(recipe, cfg, crop, device=o.device, seed=o.seed, progress=False,
                          log=lambda s: None)
    if o.precision != "auto":  # the trainer's own choice is bf16 on CUDA, fp32 on a CPU
        trainer.autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16,
                                          enabled=o.precision == "bf16")
    if o.compile:
        trainer.student_fwd = torch.compile(trainer.student, dynamic=False, mode=o.compile_mode)
        trainer.teacher_fwd = torch.compile(trainer.teacher, dynamic=False, mode=o.compile_mode)
    g = torch.Generator(o.device).manual_seed(o.seed)
    pool = torch.randint(0, 256, (4 * o.batch_size, shape.channels, shape.image_size,
                                  shape.image_size), dtype=torch.uint8, device=o.device,
                         generator=g)
    return trainer, pool, shape, crop


def step_args(trainer: DINOTrainer) -> dict:
    """Schedule values of a step at the recipe's peak (the bench runs no schedule)."""
    r = trainer.recipe
    return {"lr": r.lr * r.batch_size / 256, "wd": r.weight_decay,
            "momentum": r.teacher_momentum, "teacher_temp": r.teacher_temp,
            "freeze_last_layer": False}


def time_dinobench(o: BenchOptions, trainer: DINOTrainer, pool: torch.Tensor) -> dict:
    """Warm up (compiling, with an eager fallback), then time the step."""
    device, B = torch.device(o.device), o.batch_size
    gen = torch.Generator(device).manual_seed(o.seed + 1)
    order = torch.randperm(pool.shape[0], device=device, generator=gen)
    kw, i = step_args(trainer), [0]
    sums = torch.zeros(2, device=device)  # running loss / entropy, as fit keeps them

    def step():
        j = i[0] % 4
        out = trainer.step(pool[order[j * B:(j + 1) * B]], gen, **kw)
        sums.add_(torch.stack([out["loss"], out["teacher_entropy"]]))
        i[0] += 1

    compile_note = "on" if o.compile else "off"
    try:
        step()  # the first call compiles
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
        if not o.compile:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:120]
        compile_note = f"failed, eager fallback ({type(e).__name__}: {first})"
        trainer.student_fwd, trainer.teacher_fwd = trainer.student, trainer.teacher
        trainer.optimizer.zero_grad(set_to_none=True)
        step()
    for _ in range(max(0, o.warmup - 1)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_repeats(step, o.steps, o.repeats, Timer(device))
    mem, mem_label = peak_memory(device)
    if not torch.isfinite(sums).all():
        raise FloatingPointError("the benchmark step produced a non-finite loss")
    ips = [B / s for s in seconds]
    mean, std = mean_std(ips)
    return {"compile": compile_note, "images_per_s": mean, "images_per_s_std": std,
            "images_per_s_repeats": ips, "step_ms": 1000 * statistics.fmean(seconds),
            "epoch_seconds": EPOCH_IMAGES / mean, "peak_memory_bytes": mem,
            "peak_memory_kind": mem_label}


def bench(o: BenchOptions, log=print) -> dict:
    """Run every measurement ``o`` asks for; return the result record (what the JSON
    holds)."""
    o = o.resolved()
    if o.threads:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)
    env = environment(device)
    log(f"dinobench bench: {o.dataset_shape} shapes, {o.recipe} recipe, batch {o.batch_size}"
        f", on {env['card']}")
    trainer, pool, shape, crop = build(o)
    cfg = trainer.vit_cfg
    bf16 = o.precision == "bf16" or (o.precision == "auto" and device.type == "cuda")
    peak, peak_label = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    gen = torch.Generator(device).manual_seed(o.seed + 2)
    counted = count_step_flops(trainer, pool[:min(o.batch_size, 4)], gen, **step_args(trainer))
    formula = step_flops_formula(cfg, crop, trainer.student.head)
    log(f"  timing {o.repeats} x {o.steps} steps after {o.warmup} warm-up steps ...")
    speed = time_dinobench(o, trainer, pool)
    achieved = counted["model"] * speed["images_per_s"]
    result = {
        **env, "options": asdict(o),
        "dataset_shape": o.dataset_shape, "recipe": o.recipe, "batch_size": o.batch_size,
        "autocast": "bfloat16" if bf16 else "off (float32)",
        "global_crops": [crop.n_global, crop.global_size], "local_crops": [crop.n_local,
                                                                           crop.local_size],
        "channels": shape.channels, "grid": cfg.grid, "patch_size": cfg.patch_size,
        "vit": {"depth": cfg.depth, "dim": cfg.dim, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim},
        "head": trainer.recipe.head, "out_dim": trainer.recipe.out_dim,
        **speed,
        "flop_per_image": counted["model"], "flop_per_image_formula": formula,
        "flop_counted_over_formula": counted["model"] / formula,
        "augmentation_flop_per_image": counted["augmentation"],
        "achieved_flop_per_s": achieved, "matmul_peak_flop_per_s": peak,
        "matmul_peak_kind": peak_label, "mfu": achieved / peak,
    }
    if o.profile:
        log(f"  profiling {o.profile} steps ...")
        result["profile"] = profile_table(trainer, pool[:o.batch_size], step_args(trainer),
                                           o.profile, seed=o.seed)
    if o.compare:
        log(f"  timing the reference pipeline ({o.reference_workers} loader workers) ...")
        from .reference import time_reference_pipeline

        ref = result["reference"] = time_reference_pipeline(
            trainer, pool, crop, step_args(trainer), batch_size=o.batch_size,
            workers=o.reference_workers, warmup=o.warmup, steps=o.steps, repeats=o.repeats,
            time_loader=o.reference_loader, seed=o.seed)
        result["speedup"] = speed["images_per_s"] / ref["images_per_s"]
    if o.knn:
        log(f"  timing k-NN evaluation ({o.knn_train:,} x {o.knn_test:,}) ...")
        result["knn"] = knn_seconds(trainer.teacher.backbone, o.knn_train, o.knn_test,
                                    shape.channels, shape.image_size, shape.mean, shape.std,
                                    seed=o.seed)
    return result


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
                  f"workers, {ref['attention']} attention, autocast {ref['autocast']})"),
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


def write_result(result: dict, out: str | Path) -> Path:
    o = result["options"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dev = torch.device(o["device"]).type
    path = Path(out) / f"bench-{o['dataset_shape']}-{o['recipe']}-b{o['batch_size']}-{dev}" \
                       f"-{stamp}.json"
    atomic_write_json(path, result)
    return path


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="time the whole DINO training step (images/s, FLOPs, MFU, memory)",
        description="Time the whole DINO step (augmentation on the device, student "
        "forward/backward, teacher forward, optimizer, EMA, centering) on synthetic images "
        "resident on the device, after warm-up; print images/s, FLOPs, MFU against a matmul "
        "peak measured in the same run, and peak memory; write JSON to --out.")
    d = BenchOptions()
    p.add_argument("--device", default=None, help="torch device (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--dataset-shape", choices=sorted(SHAPES), default=d.dataset_shape,
                   help="image size, patch grid and channels of the seed's datasets "
                   "(default: cifar10)")
    p.add_argument("--recipe", choices=["seed", "official"], default=d.recipe,
                   help="recipe preset (default: seed)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step "
                   "(default: 256 on CUDA, 16 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat "
                   "(default: 50 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, "
                   "compilation included (default: 10 on CUDA, 1 on a CPU)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats; mean and "
                   "standard deviation reported (default: 3)")
    p.add_argument("--depth", type=int, default=None, help="override the recipe's ViT depth "
                   "(quick CPU runs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher, static shapes, eager fallback "
                   "if compilation fails (default: on CUDA only)")
    p.add_argument("--compile-mode", default=d.compile_mode,
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"], help="torch.compile mode")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="autocast of the step: auto is the trainer's (bf16 on CUDA, fp32 on a "
                   "CPU)")
    p.add_argument("--compare", action="store_true", help="also time the reference "
                   "pipeline (PIL multi-crop in loader workers, explicit eager attention) "
                   "in this run and print the speed-up")
    p.add_argument("--reference-workers", type=int, default=None, help="loader workers of "
                   "the reference pipeline (default: min(16, CPU count))")
    p.add_argument("--no-reference-loader", dest="reference_loader", action="store_false",
                   help="skip timing the reference loader alone")
    p.add_argument("--knn", action="store_true", help="also time k-NN evaluation, feature "
                   "extraction included")
    p.add_argument("--knn-train", type=int, default=None, help="train images for --knn "
                   "(default: 50,000 on CUDA, 1,000 on a CPU)")
    p.add_argument("--knn-test", type=int, default=None, help="test images for --knn "
                   "(default: 10,000 on CUDA, 250 on a CPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print a "
                   "torch.profiler table of N steps (default: 0, none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's; 1 gives steadier timings on a shared machine)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: 0)")
    p.add_argument("--out", default=str(d.out), metavar="DIR", help="folder for the JSON "
                   "result (default: results/bench)")
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    names = BenchOptions.__dataclass_fields__
    return BenchOptions(**{k: v for k, v in vars(args).items() if k in names})


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command: measure, print the table, write the JSON. Returns 0."""
    opts = options_from_args(args)
    result = bench(opts)
    print(format_table(result))
    if "profile" in result:
        print(f"\ntorch.profiler, {opts.profile} steps:\n{result['profile']}")
    print(f"wrote {write_result(result, opts.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dinobench.bench``: the bench command without the package CLI."""
    parser = argparse.ArgumentParser(prog="dinobench")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except UserError as e:
        print(f"dinobench bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
