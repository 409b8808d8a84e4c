"""``--compile``: one graph each for student and teacher, no graph break, no recompile,
the eager step's numbers; a fresh compiler state per run unit; a log line when Dynamo
gives up on a function at its recompile limit."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from dinobench import compiling
from dinobench.config import SEED
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.run import RunOptions, run
from dinobench.vit import ViTConfig

CUDA = torch.cuda.is_available()
STEP = dict(lr=1e-3, wd=0.04, momentum=0.99, teacher_temp=0.05, freeze_last_layer=False)


def _trainer(device: str, compile: bool) -> DINOTrainer:
    recipe = SEED.replace(dim=32, depth=2, heads=2, mlp_dim=64, batch_size=8, n_local=2,
                          drop_path=0.0).validate()
    cfg = ViTConfig(32, 8, 3, dim=32, depth=2, heads=2, mlp_dim=64)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, (0.5,) * 3, (0.25,) * 3)
    return DINOTrainer(recipe, cfg, crop, device=device, seed=0, compile=compile,
                       progress=False, log=print)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not CUDA, reason="needs a CUDA device")])])
def test_compiled_step_is_two_graphs_without_recompiles_and_matches_eager(device,
                                                                          monkeypatch):
    """Without drop path both trainers start equal and see the same crops. On a CPU the
    graphs run through aot_eager (Dynamo and AOT autograd, no code generation, so the
    unit tests need no C++ compiler); on CUDA through inductor, under bf16 autocast."""
    if device == "cpu":
        real = torch.compile
        monkeypatch.setattr(torch, "compile",
                            lambda m, **kw: real(m, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _trainer(device, False), _trainer(device, True)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    tol = dict(rel=1e-5) if device == "cpu" else dict(rel=2e-2)
    for i in range(3):
        want = eager.step(images, torch.Generator(device).manual_seed(i), **STEP)["loss"]
        got = compiled.step(images, torch.Generator(device).manual_seed(i), **STEP)["loss"]
        assert float(got) == pytest.approx(float(want), **tol), f"step {i}"
    assert compiled.student_fwd is not compiled.student  # no eager fallback
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == 2 == counters["frames"]["ok"]  # no recompiles


def test_the_recompile_limit_is_logged():
    logs = []
    watcher = compiling.watch_recompile_limit(logs.append)
    torch._dynamo.reset()

    def double(x):
        return 2 * x

    f = torch.compile(double, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(**{compiling.recompile_limit_name(): 1}):
        for n in (2, 3, 4):  # three shapes, one allowed: the third runs eagerly
            assert torch.equal(f(torch.ones(n)), torch.full((n,), 2.0))
    assert len(logs) == 1 and "'double'" in logs[0] and "eager mode" in logs[0]
    assert "recompile_limit (1)" in logs[0] or "cache_size_limit (1)" in logs[0]
    assert watcher.hits[-1].startswith("'double'")


def test_every_compiled_run_unit_starts_from_a_fresh_compiler(monkeypatch, tmp_path):
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)  # the bookkeeping, not inductor
    opts = RunOptions(datasets=["digits"], seeds=[0, 1], compile=True, out=tmp_path / "r",
                      progress=False, probe=False, eval_every=0, attention_images=2,
                      overrides=dict(depth=1, dim=32, heads=2, mlp_dim=64, batch_size=128,
                                     n_local=2, epochs=1))
    run(opts, log=lambda s: None)
    assert len(resets) == 2
    assert compiling.WATCHER in logging.getLogger("torch._dynamo").handlers
