"""What each speed lever gives, measured side by side in one run on one device.

    python benchmarks/levers.py [--device cpu] [--batch 8] [--depth 12] [--rounds 7]
                                [--compile] [--precision-only | --alignment-only]

Each lever is timed against its baseline in alternating rounds (A, B, A, B, ...), so load
from other processes hits both alike; the table gives the median time of each and the
median of the per-round ratios with its range. Prints Markdown; ``--json`` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

from dinobench.bench import SHAPES
from dinobench.config import SEED, SMALL
from dinobench.dino import ema
from dinobench.dino.clip import clip_per_tensor_
from dinobench.dino.ema import ema_update_
from dinobench.dino.model_setup import param_groups
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.perf import Timer, environment
from dinobench.reference import (
    ReferenceDataset,
    ReferenceMultiCrop,
    ReferenceTrainer,
    use_explicit_attention_,
)
from dinobench.vit import ViTConfig


def side_by_side(name: str, lever: str, baseline: str, fa, fb, rounds: int, timer: Timer,
                 per: int = 1) -> dict:
    """Median seconds of ``fa`` (the lever) and ``fb`` (its baseline) over alternating
    rounds after one warm-up call each; ``per``: items per call, for a per-item time."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((fa, ta), (fb, tb)):
            timer.start()
            fn()
            out.append(timer.stop() / per)
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"lever": name, "a": lever, "b": baseline, "a_s": statistics.median(ta),
            "b_s": statistics.median(tb), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds}


@torch.no_grad()
def ema_loop_(teacher, student, momentum: float) -> None:
    """The DINO reference code's EMA: one multiply-add per parameter tensor."""
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.data.mul_(momentum).add_((1 - momentum) * p_s.detach().data)


@torch.no_grad()
def clip_unbind_(params, max_norm: float) -> None:
    """The per-tensor clip as it was: 0-d scales from ``unbind``, which send
    ``_foreach_mul_`` down its one-``mul_``-per-tensor path."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    scale = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, list(scale.unbind()))


def ema_unpaired_(teacher, student, momentum: float) -> None:
    """The EMA with its parameter pairing rebuilt at every call, as it was."""
    ema._PAIRS.pop(teacher, None)
    ema_update_(teacher, student, momentum)


@torch.no_grad()
def clip_ema_lists(grads, t_list, s_list, max_norm: float, weight: float) -> None:
    """Per-tensor clip and EMA in plain per-tensor ops, for torch.compile to fuse."""
    for g in grads:
        g.mul_((max_norm / (torch.linalg.vector_norm(g) + 1e-6)).clamp(max=1.0))
    for t, s in zip(t_list, s_list):
        t.lerp_(s, weight)


def count_blocking_constants(trainer: DINOTrainer, batch, kw) -> int:
    """Calls of ``torch.tensor(..., device=...)`` during one step: on CUDA each is a
    host-to-device copy from pageable memory that blocks the host until the GPU is idle."""
    calls, original = [0], torch.tensor

    def counting(*args, **kwargs):
        if kwargs.get("device") is not None:
            calls[0] += 1
        return original(*args, **kwargs)

    torch.tensor = counting
    try:
        trainer.step(batch, None, **kw)
    finally:
        torch.tensor = original
    return calls[0]


def measure(device: torch.device, batch: int, depth: int, rounds: int,
            compile_lists: bool = False) -> list[dict]:
    shape = SHAPES["cifar10"]
    recipe = SEED.replace(batch_size=batch, depth=depth).validate()
    cfg = ViTConfig(image_size=32, grid=8, in_chans=3, depth=depth)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, shape.mean, shape.std)
    trainer = DINOTrainer(recipe, cfg, crop, device=device, progress=False, log=lambda s: None)
    ref = ReferenceTrainer(recipe, cfg, device=device)
    timer, cuda = Timer(device), device.type == "cuda"
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    gen = torch.Generator(device).manual_seed(0)
    crops = trainer.multicrop(images, gen)
    kw = {"lr": 1e-4, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.05,
          "freeze_last_layer": False}
    rows = []

    # Fused attention: ViT forward + backward on the global crops, bf16 on CUDA.
    fused = trainer.student.backbone
    explicit = use_explicit_attention_(copy.deepcopy(fused))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def fwd_bwd(model):
        def run():
            with amp:
                out = model(crops[0])
            out.float().square().mean().backward()
        return run

    rows.append(side_by_side("attention (ViT fwd+bwd, global crops)", "SDPA", "explicit",
                             fwd_bwd(fused), fwd_bwd(explicit), rounds, timer))
    if not cuda:  # CPU autocast: bf16 matmuls where the CPU has them (AVX512-BF16, AMX)
        cpu_bf16 = torch.autocast("cpu", dtype=torch.bfloat16)

        def fwd_bwd_bf16():
            with cpu_bf16:
                out = fused(crops[0])
            out.float().square().mean().backward()

        rows.append(side_by_side("CPU autocast (ViT fwd+bwd, global crops)", "bf16", "fp32",
                                 fwd_bwd_bf16, fwd_bwd(fused), rounds, timer))
    rows.append(side_by_side("teacher EMA", "torch._foreach_lerp_", "per-parameter loop",
                             lambda: ema_update_(trainer.teacher, trainer.student, 0.996),
                             lambda: ema_loop_(trainer.teacher, trainer.student, 0.996),
                             rounds * 3, timer))
    ds = ReferenceDataset(images.cpu(), ReferenceMultiCrop(crop, 3))
    rows.append(side_by_side("multi-crop, per image", "batched on device",
                             "PIL per image, one process",
                             lambda: trainer.multicrop(images, gen),
                             lambda: [ds[i] for i in range(batch)], rounds, timer, per=batch))
    if not cuda:  # fused AdamW is what CUDA already uses; on a CPU it is opt-in
        student = trainer.student
        for p in student.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts = [torch.optim.AdamW(param_groups(student), lr=1e-6, fused=f) for f in (True, False)]
        rows.append(side_by_side("AdamW step", "fused", "foreach (default)", opts[0].step,
                                 opts[1].step, rounds * 3, timer))
    student, teacher = trainer.student, trainer.teacher
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    rows.append(side_by_side("gradient clip, per tensor", "clip_per_tensor_",
                             "0-d scales (unbind)", lambda: clip_per_tensor_(params, 3.0),
                             lambda: clip_unbind_(params, 3.0), rounds * 3, timer))
    rows.append(side_by_side("teacher EMA, parameter pairing", "cached", "rebuilt per call",
                             lambda: ema_update_(teacher, student, 0.996),
                             lambda: ema_unpaired_(teacher, student, 0.996), rounds * 3,
                             timer))
    if compile_lists:  # inductor fuses the per-tensor loops into a few kernels
        grads = [p.grad for p in params]
        t_list, s_list = ema._pair(teacher, student)
        fused = torch.compile(clip_ema_lists, dynamic=False)
        rows.append(side_by_side("clip + EMA", "torch.compile", "eager (both above)",
                                 lambda: fused(grads, t_list, s_list, 3.0, 0.004),
                                 lambda: (clip_per_tensor_(params, 3.0),
                                          ema_update_(teacher, student, 0.996)),
                                 rounds * 3, timer))
    rows.append(side_by_side("whole step (same crops)", "DINOTrainer.step, multi-crop "
                             "included", "reference step, crops ready",
                             lambda: trainer.step(images, gen, **kw),
                             lambda: ref.step(crops, **kw), rounds, timer))
    rows.append({"lever": "blocking constant tensors per step",
                 "count": count_blocking_constants(trainer, images, kw)})
    if not cuda:
        rows.append(small_step_precision(device, rounds, timer))
    return rows


def _small_steps(device: torch.device, variants: dict) -> dict:
    """One ``step`` closure per ``{label: (recipe, precision)}``: trainers of the
    ``small`` recipe's shape on MNIST (what the CPU runs use), each with the same weights,
    batch and generator seed."""
    shape = SHAPES["mnist"]
    steps = {}
    for label, (recipe, precision) in variants.items():
        recipe = recipe.for_dataset(shape.natural_images).validate()
        size = recipe.image_size or shape.image_size
        cfg = ViTConfig.for_recipe(recipe, size, recipe.grid or shape.grid, shape.channels)
        crop = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size,
                                           shape.mean, shape.std)
        images = torch.randint(0, 256, (recipe.batch_size, shape.channels, shape.image_size,
                                        shape.image_size), dtype=torch.uint8, device=device,
                               generator=torch.Generator(device).manual_seed(0))
        kw = {"lr": 1e-4, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.04,
              "freeze_last_layer": False}
        torch.manual_seed(0)
        tr = DINOTrainer(recipe, cfg, crop, device=device, progress=False, log=lambda s: None,
                         precision=precision)
        gen = torch.Generator(device).manual_seed(0)
        steps[label] = lambda tr=tr, gen=gen, images=images, kw=kw: tr.step(images, gen, **kw)
    return steps


def small_step_precision(device: torch.device, rounds: int, timer: Timer) -> dict:
    """``--precision bf16`` against fp32 for the whole step of the ``small`` recipe on
    MNIST's shape."""
    steps = _small_steps(device, {"bf16": (SMALL, "bf16"), "fp32": (SMALL, "fp32")})
    return side_by_side(f"CPU autocast, whole step (small recipe, MNIST shape, batch "
                        f"{SMALL.batch_size})", "--precision bf16", "fp32", steps["bf16"],
                        steps["fp32"], rounds * 3, timer)


def alignment_cost(device: torch.device, rounds: int, timer: Timer) -> dict:
    """``--align-weight 1`` against none, on the MNIST recipe it was screened on
    (KoLeo, a 16-px input, elastic crops): the whole step, the same weights and crops. The
    term reuses the features both forwards already return, so any cost is its own
    arithmetic and backward."""
    mnist = SMALL.replace(lr=1e-3, pos_embed_std=1.0, koleo_weight=1.0, image_size=16,
                          elastic=0.2, epochs=4)
    steps = _small_steps(device, {"align": (mnist.replace(align_weight=1.0), "fp32"),
                                  "none": (mnist, "fp32")})
    return side_by_side("alignment term, whole step (MNIST elastic recipe, batch "
                        f"{mnist.batch_size})", "--align-weight 1", "without",
                        steps["align"], steps["none"], rounds * 3, timer)


def table(rows: list[dict], env: dict) -> str:
    lines = [f"{env['card']}, torch {env['torch']}", "",
             "| lever | lever time | baseline | baseline time | speed-up (median, range) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "count" in r:
            lines.append(f"| {r['lever']} | {r['count']} | | | |")
            continue
        lines.append(f"| {r['lever']} | {r['a']}: {r['a_s'] * 1e3:.3f} ms | {r['b']} | "
                     f"{r['b_s'] * 1e3:.3f} ms | {r['ratio']:.2f}x ({r['ratio_min']:.2f}-"
                     f"{r['ratio_max']:.2f}, {r['rounds']} rounds) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 8 on a CPU")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also time clip + EMA compiled "
                   "by torch.compile against eager")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--precision-only", action="store_true", help="only the CPU's "
                      "--precision bf16 against fp32 for the small recipe's whole step")
    only.add_argument("--alignment-only", action="store_true", help="only the whole step "
                      "of the MNIST elastic recipe with --align-weight 1 against without")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    batch = a.batch or (256 if device.type == "cuda" else 8)
    env = environment(device)
    if a.precision_only:
        rows = [small_step_precision(device, a.rounds, Timer(device))]
        title = "the small recipe's whole step at MNIST shapes, bf16 against fp32"
    elif a.alignment_only:
        rows = [alignment_cost(device, a.rounds, Timer(device))]
        title = "the MNIST elastic recipe's whole step, with the alignment term and without"
    else:
        rows = measure(device, batch, a.depth, a.rounds, a.compile)
        env.update(batch=batch, depth=a.depth)  # the whole-step modes fix their own
        title = f"levers at batch {batch}, depth {a.depth}, CIFAR-10 shapes, seed recipe"
    print(title)
    print(table(rows, env))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
