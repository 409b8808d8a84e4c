"""``dinobench bench``: how fast is the whole DINO training step on this machine?

Times :meth:`DINOTrainer.step` (device multi-crop, student forward/backward, teacher
forward, optimizer, EMA, centering) on synthetic ``uint8`` images resident on the device,
after warm-up: CUDA events on a GPU, ``time.perf_counter`` on a CPU; mean and spread over
repeats. FLOPs are counted from the model with ``torch.utils.flop_counter`` and checked
against :func:`step_flops_formula`; MFU is read against a matmul peak measured in the same
run. ``--compare`` times the reference pipeline (:mod:`dinobench.reference`) in the same
process on the same device and prints the speed-up as a ratio. ``--knn`` times k-NN
evaluation, feature extraction included. Each figure is logged with the run's elapsed time
as soon as it exists, and the run's JSON file in ``--out`` is rewritten (atomically) after
each part, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .bench_table import EPOCH_IMAGES, format_table, result_path
from .config import PRECISIONS, RECIPES, get_recipe
from .data.registry import SPECS, DatasetSpec
from .devices import resolve_device
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer, resolved_precision
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
    reference_workers_default,
    step_flops_formula,
    time_repeats,
)
from .vit import ViTConfig

# The seed's three datasets, from the registry: image side, patch grid, channels and the
# normalisation statistics. Local crops keep the patch size and half the side.
SHAPES = {name: SPECS[name] for name in ("mnist", "cifar10", "stl10")}
LARGE_BATCH = 512  # from here on the reference loader prefetches one batch per worker


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
    reference_workers: int | None = None  # None: nproc - 2, at least 1
    reference_prefetch: int | None = None  # batches per worker; None: 1 at batch >= 512, else 2
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
        resolved_precision(self.precision, dev)  # a clear error for a bad name
        if self.dataset_shape not in SHAPES:
            raise ConfigError(f"--dataset-shape must be one of {', '.join(SHAPES)}")
        cuda = dev.type == "cuda"
        o = BenchOptions(**{**self.__dict__, "device": str(dev), "out": str(self.out)})
        for name, gpu, cpu in (("batch_size", 256, 16), ("steps", 50, 3), ("warmup", 10, 1),
                               ("compile", True, False), ("knn_train", 50_000, 1_000),
                               ("knn_test", 10_000, 250)):
            if getattr(o, name) is None:
                setattr(o, name, gpu if cuda else cpu)
        if o.reference_workers is None:
            o.reference_workers = reference_workers_default()
        if o.reference_prefetch is None:  # bounds the crops waiting in shared memory
            o.reference_prefetch = 1 if o.batch_size >= LARGE_BATCH else 2
        for name, low in (("batch_size", 1), ("steps", 1), ("repeats", 1), ("knn_train", 1),
                          ("knn_test", 1), ("threads", 1), ("depth", 1), ("warmup", 0),
                          ("reference_workers", 0), ("reference_prefetch", 1),
                          ("profile", 0)):
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
    recipe = (get_recipe(o.recipe).replace(**changes).for_dataset(shape.natural_images)
              .validate())
    cfg = ViTConfig.for_recipe(recipe, shape.image_size, shape.grid, shape.channels)
    crop = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size, shape.mean,
                                       shape.std)
    trainer = DINOTrainer(recipe, cfg, crop, device=o.device, seed=o.seed, progress=False,
                          log=lambda s: None, precision=o.precision)
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


def time_dinobench(o: BenchOptions, trainer: DINOTrainer, pool: torch.Tensor,
                   say=lambda msg: None) -> dict:
    """Warm up (compiling, with an eager fallback), then time the step. The first step
    and the whole warm-up are timed on the wall clock too: what the warm-up takes beyond
    its steps at the timed speed is the compilation."""
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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    compile_note = "on" if o.compile else "off"
    t0 = time.perf_counter()
    try:
        step()  # the first call compiles
    except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
        if not o.compile:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:120]
        compile_note = f"failed, eager fallback ({type(e).__name__}: {first})"
        say(f"torch.compile {compile_note}")
        trainer.student_fwd, trainer.teacher_fwd = trainer.student, trainer.teacher
        trainer.optimizer.zero_grad(set_to_none=True)
        step()
    sync()
    first_s = time.perf_counter() - t0
    say(f"first step {first_s:.2f} s (torch.compile {compile_note})")
    for _ in range(max(0, o.warmup - 1)):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_repeats(step, o.steps, o.repeats, Timer(device))
    mem, mem_label = peak_memory(device)
    if not torch.isfinite(sums).all():
        raise FloatingPointError("the benchmark step produced a non-finite loss")
    ips = [B / s for s in seconds]
    mean, std = mean_std(ips)
    step_s = statistics.fmean(seconds)
    compile_s = max(0.0, warmup_s - max(1, o.warmup) * step_s)
    say(f"{mean:,.1f} ± {std:,.1f} images/s, step {1000 * step_s:,.2f} ms; compilation "
        f"{compile_s:.1f} s of a {warmup_s:.1f} s warm-up")
    return {"compile": compile_note, "images_per_s": mean, "images_per_s_std": std,
            "images_per_s_repeats": ips, "step_ms": 1000 * step_s,
            "epoch_seconds": EPOCH_IMAGES / mean, "peak_memory_bytes": mem,
            "peak_memory_kind": mem_label, "first_step_seconds": first_s,
            "warmup_seconds": warmup_s, "compile_seconds": compile_s}


def bench(o: BenchOptions, log=print, path: str | Path | None = None) -> dict:
    """Run every measurement ``o`` asks for; return the result record (what the JSON
    holds). Each figure is logged as soon as it exists, with the seconds since the start;
    with ``path`` the JSON is rewritten there after each part."""
    o = o.resolved()
    if o.threads:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        log(f"  [{time.perf_counter() - t_start:7.1f} s] {msg}")

    env = environment(device)
    log(f"dinobench bench: {o.dataset_shape} shapes, {o.recipe} recipe, batch {o.batch_size}"
        f", on {env['card']}")
    watcher = None
    if o.compile:  # a clean cache, and a log line if a function falls back at its limit
        from .compiling import fresh_compile_state

        watcher = fresh_compile_state(say)
    trainer, pool, shape, crop = build(o)
    cfg = trainer.vit_cfg
    bf16 = resolved_precision(o.precision, device) == "bf16"
    result = {
        **env, "options": asdict(o),
        "dataset_shape": o.dataset_shape, "recipe": o.recipe, "batch_size": o.batch_size,
        "autocast": "bfloat16" if bf16 else "off (float32)",
        "global_crops": [crop.n_global, crop.global_size], "local_crops": [crop.n_local,
                                                                           crop.local_size],
        "channels": shape.channels, "grid": cfg.grid, "patch_size": cfg.patch_size,
        "vit": {"depth": cfg.depth, "dim": cfg.dim, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim},
        "head": trainer.recipe.head, "out_dim": trainer.recipe.out_dim, "parts": [],
    }

    def done(part: str) -> None:
        result["parts"].append(part)
        result["seconds"] = time.perf_counter() - t_start
        if watcher is not None:
            result["recompile_limit_hits"] = list(watcher.hits)
        if path is not None:
            atomic_write_json(path, result)

    say(f"timing {o.repeats} x {o.steps} steps after {o.warmup} warm-up steps ...")
    result.update(time_dinobench(o, trainer, pool, say))
    done("step")
    gen = torch.Generator(device).manual_seed(o.seed + 2)
    counted = count_step_flops(trainer, pool[:min(o.batch_size, 4)], gen, **step_args(trainer))
    formula = step_flops_formula(cfg, crop, trainer.student.head)
    result.update({"flop_per_image": counted["model"], "flop_per_image_formula": formula,
                   "flop_counted_over_formula": counted["model"] / formula,
                   "augmentation_flop_per_image": counted["augmentation"]})
    say(f"{counted['model'] / 1e9:.3g} GFLOP per image (formula {formula / 1e9:.3g})")
    done("flops")
    peak, peak_label = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
    achieved = counted["model"] * result["images_per_s"]
    result.update({"achieved_flop_per_s": achieved, "matmul_peak_flop_per_s": peak,
                   "matmul_peak_kind": peak_label, "mfu": achieved / peak})
    say(f"matmul peak {peak / 1e12:.3g} TFLOP/s ({peak_label}); MFU "
        f"{100 * achieved / peak:.2f}%")
    done("peak")
    if o.profile:
        say(f"profiling {o.profile} steps ...")
        result["profile"] = profile_table(trainer, pool[:o.batch_size], step_args(trainer),
                                           o.profile, seed=o.seed)
        done("profile")
    if o.compare:
        say(f"timing the reference pipeline ({o.reference_workers} loader workers, prefetch "
            f"{o.reference_prefetch}) ...")
        from .reference import time_reference_pipeline

        ref = result["reference"] = time_reference_pipeline(
            trainer, pool, crop, step_args(trainer), batch_size=o.batch_size,
            workers=o.reference_workers, prefetch_factor=o.reference_prefetch,
            warmup=o.warmup, steps=o.steps, repeats=o.repeats,
            time_loader=o.reference_loader, seed=o.seed)
        result["speedup"] = result["images_per_s"] / ref["images_per_s"]
        say(f"reference {ref['images_per_s']:,.1f} images/s (model step alone "
            f"{ref['model_step_images_per_s']:,.1f}); speed-up {result['speedup']:.2f}x")
        done("reference")
    if o.knn:
        say(f"timing k-NN evaluation ({o.knn_train:,} x {o.knn_test:,}) ...")
        result["knn"] = knn_seconds(trainer.teacher.backbone, o.knn_train, o.knn_test,
                                    shape.channels, shape.image_size, shape.mean, shape.std,
                                    seed=o.seed)
        say(f"k-NN {o.knn_train:,} x {o.knn_test:,}: {result['knn']['seconds']:.3f} s, "
            "features included")
        done("knn")
    return result


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
    p.add_argument("--recipe", choices=sorted(RECIPES), default=d.recipe,
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
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="autocast of the step: auto is the trainer's (bf16 on CUDA, fp32 on a "
                   "CPU)")
    p.add_argument("--compare", action="store_true", help="also time the reference "
                   "pipeline (PIL multi-crop in loader workers, explicit eager attention) "
                   "in this run and print the speed-up")
    p.add_argument("--reference-workers", type=int, default=None, help="loader workers of "
                   "the reference pipeline (default: nproc - 2, at least 1)")
    p.add_argument("--reference-prefetch", type=int, default=None, metavar="N",
                   help="batches each reference worker prepares ahead (default: 1 at batch "
                   f"{LARGE_BATCH} and above, else 2)")
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
    """The ``bench`` command: measure (logging each figure and rewriting the JSON as it
    goes), then print the table. Returns 0."""
    opts = options_from_args(args)
    resolved = opts.resolved()
    path = result_path(asdict(resolved), opts.out)
    print(f"writing {path} after each part")
    result = bench(resolved, path=path)
    print(format_table(result))
    if "profile" in result:
        print(f"\ntorch.profiler, {opts.profile} steps:\n{result['profile']}")
    print(f"wrote {path}")
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
