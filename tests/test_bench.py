"""The bench command: FLOP counting, options, JSON output written part by part, live
logging; on CUDA, the step without host synchronisation (eager, compiled, inside fit) and
compiled without recompiles. The reference pipeline has test_reference.py. No timing
assertions: speed targets live in ``dinobench bench`` output and in benchmarks/ only."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dinobench import bench, perf, reference
from dinobench.cli import main
from dinobench.config import SEED
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.errors import ConfigError, UserError
from dinobench.vit import ViT, ViTConfig
from helpers import one_line_error, tiny_setup

CUDA = torch.cuda.is_available()


def gpu(test):
    """A correctness test on CUDA: selected by ``pytest -m gpu``, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


@pytest.mark.parametrize("head", ["seed", "official"])
def test_counted_flops_match_the_formula(head):
    recipe, cfg, crop = tiny_setup(head)
    trainer = DINOTrainer(recipe, cfg, crop, progress=False, log=lambda s: None)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    counted = perf.count_step_flops(trainer, images, torch.Generator().manual_seed(0),
                                    lr=1e-4, wd=0.04, momentum=0.99, teacher_temp=0.05,
                                    freeze_last_layer=False)
    formula = perf.step_flops_formula(cfg, crop, trainer.student.head)
    # The counter also sees the fused attention backward recompute the logits (torch
    # counts that backward as 2.5 forwards, the formula as 2) and the loss's einsum.
    g, n = crop.global_size // 4, crop.local_size // 4
    attention = cfg.depth * 4 * cfg.dim * (crop.n_global * (1 + g * g) ** 2
                                           + crop.n_local * (1 + n * n) ** 2)
    assert counted["model"] == pytest.approx(formula + 0.5 * attention, rel=0.002)
    assert counted["augmentation"] > 0  # the blur's convolutions
    # The trainer is left as it was: its own multi-crop and forward functions.
    assert trainer.multicrop.__class__.__name__ == "MultiCrop"
    assert trainer.student_fwd is trainer.student


def test_formula_is_the_documented_seed_count():
    # DESIGN.md: about 10.2 GFLOP per image per step for the seed's ViT on CIFAR-10.
    recipe = SEED
    cfg = ViTConfig(image_size=32, grid=8, in_chans=3)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, (0.5,) * 3, (0.25,) * 3)
    head = torch.nn.Linear(192, 10)
    assert perf.step_flops_formula(cfg, crop, head) == pytest.approx(10.2e9, rel=0.01)


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--batch-size"):
        bench.BenchOptions(device="cpu", batch_size=0).resolved()
    with pytest.raises(ConfigError, match="--dataset-shape"):
        bench.BenchOptions(device="cpu", dataset_shape="imagenet").resolved()
    with pytest.raises(UserError, match="--device 'gpu0'"):
        bench.BenchOptions(device="gpu0").resolved()
    with pytest.raises(ConfigError, match="--depth"):
        bench.BenchOptions(device="cpu", depth=0).resolved()
    o = bench.BenchOptions(device="cpu").resolved()
    assert (o.batch_size, o.compile) == (16, False)  # CPU defaults


BAD_BENCH_FLAGS = [
    (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--depth", "0"], "--depth must be at least 1, got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    (["--reference-prefetch", "0"], "--reference-prefetch must be at least 1, got 0"),
    (["--device", "gpu0"], "--device 'gpu0' is not a torch device; use cpu, cuda or cuda:N"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--dataset-shape", "imagenet"], "argument --dataset-shape: invalid choice: 'imagenet'"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_BENCH_FLAGS,
                         ids=[" ".join(f) for f, _ in BAD_BENCH_FLAGS])
def test_bad_bench_flags_exit_2_with_one_line(flags, expected, tmp_path, capsys):
    """Through the package CLI, as typed: exit 2, one line naming the flag and its bound,
    no progress line, and no result folder."""
    out = tmp_path / "bench"
    try:
        code = main(["bench", *flags, "--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    assert line.startswith("dinobench bench: error: ") and expected in line, line
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.skipif(CUDA, reason="checks the message shown where CUDA is missing")
def test_cuda_requested_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="--device cpu"):
        bench.BenchOptions(device="cuda").resolved()


def _parse(argv, parser_class=argparse.ArgumentParser):
    parser = argparse.ArgumentParser(prog="dinobench")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    p = bench.add_bench_parser(sub)
    return p, parser.parse_args(["bench", *argv])


def test_parser_uses_the_subparsers_class_and_maps_every_flag():
    class Custom(argparse.ArgumentParser):
        pass

    p, args = _parse(["--device", "cpu", "--no-compile", "--batch-size", "8", "--depth", "2",
                      "--compare", "--reference-workers", "1", "--no-reference-loader",
                      "--knn", "--knn-train", "64", "--dataset-shape", "stl10"], Custom)
    assert isinstance(p, Custom)
    o = bench.options_from_args(args)
    assert (o.device, o.compile, o.batch_size, o.depth, o.compare, o.reference_workers,
            o.reference_loader, o.knn, o.knn_train, o.dataset_shape) == (
        "cpu", False, 8, 2, True, 1, False, True, 64, "stl10")


def test_run_bench_writes_one_complete_json(tmp_path, capsys):
    _, args = _parse(["--device", "cpu", "--depth", "1", "--batch-size", "4", "--steps", "2",
                      "--repeats", "2", "--warmup", "1", "--compare", "--reference-workers",
                      "0", "--knn", "--knn-train", "64", "--knn-test", "16", "--out",
                      str(tmp_path)])
    assert bench.run_bench(args) == 0
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary file left over
    r = json.loads(files[0].read_text())
    for key in ("card", "torch", "cuda", "batch_size", "images_per_s", "epoch_seconds",
                "flop_per_image", "mfu", "peak_memory_bytes", "matmul_peak_flop_per_s"):
        assert key in r, key
    for key in ("images_per_s", "step_ms", "epoch_seconds", "flop_per_image", "mfu",
                "peak_memory_bytes", "matmul_peak_flop_per_s", "speedup"):
        assert r[key] > 0, key
    assert len(r["images_per_s_repeats"]) == 2
    assert r["epoch_seconds"] == pytest.approx(50_000 / r["images_per_s"])
    assert r["mfu"] == pytest.approx(r["achieved_flop_per_s"] / r["matmul_peak_flop_per_s"])
    assert r["speedup"] == pytest.approx(r["images_per_s"] / r["reference"]["images_per_s"])
    assert r["reference"]["loader_images_per_s"] > 0 and r["knn"]["seconds"] > 0
    assert r["parts"] == ["step", "flops", "peak", "reference", "knn"]
    assert r["first_step_seconds"] > 0 and r["compile_seconds"] >= 0
    out = capsys.readouterr().out
    assert "| images/s |" in out and "| speed-up (same run, same device) |" in out
    assert "| first step (compilation included) |" in out


def test_each_part_is_logged_and_saved_as_soon_as_it_exists(tmp_path):
    """A run stopped after any part keeps what it measured: when a figure is logged, the
    JSON on disk already holds it, and the parts still to come are not there."""
    path = tmp_path / "bench.json"
    seen = []

    def log(msg: str) -> None:
        on_disk = json.loads(path.read_text()) if path.exists() else {}
        seen.append((msg, on_disk.get("parts", [])))

    r = bench.bench(bench.BenchOptions(device="cpu", depth=1, batch_size=4, steps=1,
                                       repeats=1, warmup=1, compare=True,
                                       reference_workers=0, knn=True, knn_train=32,
                                       knn_test=8), log=log, path=path)

    def first(text):
        return next(parts for msg, parts in seen if text in msg)

    assert first("first step") == [] and first("images/s,") == []
    assert first("GFLOP per image") == ["step"]
    assert first("matmul peak") == ["step", "flops"]
    assert first("speed-up") == ["step", "flops", "peak"]
    assert first("k-NN 32 x 8:") == ["step", "flops", "peak", "reference"]
    assert json.loads(path.read_text())["parts"] == r["parts"]
    # Every line after the heading carries the seconds since the start.
    assert all(msg.lstrip().startswith("[") and " s] " in msg for msg, _ in seen[1:])


def test_warm_up_runs_for_the_asked_seconds():
    class FakeTimer:  # every round of calls "takes" 0.5 s
        def start(self):
            pass

        def stop(self):
            return 0.5

    calls = []
    assert perf.warm_up(lambda: calls.append(1), 1.0, FakeTimer(), calls=2) == 4
    assert len(calls) == 4
    assert perf.warm_up(lambda: None, 0.0, FakeTimer()) == 1  # one round at least


def test_a_failing_compiler_falls_back_to_eager(monkeypatch, tmp_path):
    def broken_compile(module, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    r = bench.bench(bench.BenchOptions(device="cpu", depth=1, batch_size=4, steps=1,
                                       repeats=1, warmup=1, compile=True), log=lambda s: None)
    assert r["compile"].startswith("failed, eager fallback (RuntimeError: no C++ compiler")
    assert r["images_per_s"] > 0


STEP_KW = {"lr": 1e-4, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.05,
           "freeze_last_layer": False}


def _cuda_trainer(compile: bool, **changes) -> DINOTrainer:
    """A CUDA trainer past its first steps (compilation, lazy initialisation: these may
    synchronise)."""
    recipe, cfg, crop = tiny_setup(**changes)
    trainer = DINOTrainer(recipe, cfg, crop, device="cuda", compile=compile,
                          progress=False, log=print)
    images = torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), dtype=torch.uint8,
                           device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    for _ in range(2):
        trainer.step(images, gen, **STEP_KW)
    torch.cuda.synchronize()
    assert trainer.student_fwd is not trainer.student or not compile  # still compiled
    return trainer


@gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_step_makes_no_host_sync(compile):
    """The step must never make the host wait for the GPU (no .item(), no blocking
    copies): that is what lets the CPU queue work ahead. Backward included: a sync there
    raises through the autograd engine."""
    trainer = _cuda_trainer(compile)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
    gen = torch.Generator("cuda").manual_seed(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(images, gen, **STEP_KW)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _fit_syncs(compile: bool, steps: int) -> int:
    """Host synchronisations of the CUDA runtime during a one-epoch ``fit`` of ``steps``
    steps, counted by the profiler on every thread (the backward's too)."""
    from torch.profiler import ProfilerActivity, profile

    trainer = _cuda_trainer(compile, epochs=1)
    images = torch.randint(0, 256, (steps * 4, 3, 32, 32), dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.fit(images)
    return sum("Synchronize" in e.name for e in prof.events())


@gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_cuda_fit_synchronises_per_epoch_not_per_step(compile):
    """fit() reads its running sums once per epoch: an epoch of 8 steps waits for the
    GPU exactly as often as an epoch of 2."""
    few, many = _fit_syncs(compile, 2), _fit_syncs(compile, 8)
    assert few > 0  # the counter sees the epoch's own synchronisation
    assert many == few, f"{many - few} more synchronisations for 6 more steps"


@gpu
def test_explicit_and_fused_attention_agree_under_bf16_on_cuda():
    cfg = ViTConfig(image_size=32, grid=8, in_chans=3)
    fused = ViT(cfg).cuda().eval()
    explicit = reference.use_explicit_attention_(ViT(cfg).cuda().eval())
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(64, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fused(x).float(), explicit(x).float()
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


@gpu
def test_bench_runs_compiled_on_cuda(tmp_path):
    """Compiled: two graphs (student, teacher), no graph break, no recompile through the
    warm-up and timed steps."""
    from torch._dynamo.utils import counters

    r = bench.bench(bench.BenchOptions(device="cuda", depth=1, batch_size=32, steps=3,
                                       repeats=2, warmup=2, compile=True, out=tmp_path),
                    log=lambda s: None)
    assert r["compile"] == "on" and r["recompile_limit_hits"] == []
    assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_bytes"] > 0
    assert r["compile_seconds"] > 0 and r["first_step_seconds"] >= r["compile_seconds"]
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 2


def test_precision_option_sets_the_step_autocast_and_the_peak_dtype():
    r = bench.bench(bench.BenchOptions(device="cpu", depth=1, batch_size=4, steps=1,
                                       repeats=1, warmup=1, precision="bf16"),
                    log=lambda s: None)
    assert r["autocast"] == "bfloat16" and r["matmul_peak_kind"].startswith("bfloat16")
    with pytest.raises(ConfigError, match="--precision"):
        bench.BenchOptions(device="cpu", precision="fp8").resolved()
