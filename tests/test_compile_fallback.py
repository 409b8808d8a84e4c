"""``--compile`` must never end a run that eager mode could finish: a compiler failure at
the first step falls back to eager with one log line; later errors are not swallowed."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import SEED
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.vit import ViTConfig

STEP = dict(lr=1e-4, wd=0.04, momentum=0.99, teacher_temp=0.05, freeze_last_layer=False)


def _trainer(compile: bool, log) -> DINOTrainer:
    recipe = SEED.replace(dim=32, depth=1, heads=2, mlp_dim=64, batch_size=4, n_local=2)
    cfg = ViTConfig(32, 8, 3, dim=32, depth=1, heads=2, mlp_dim=64)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, (0.5,) * 3, (0.25,) * 3)
    return DINOTrainer(recipe, cfg, crop, compile=compile, progress=False, log=log)


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)


def test_trainer_falls_back_to_eager_when_compilation_fails(monkeypatch):
    def broken_compile(module, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("no working C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    logs = []
    trainer = _trainer(compile=True, log=logs.append)
    out = trainer.step(_images(), None, **STEP)
    assert torch.isfinite(out["loss"]) and trainer.student_fwd is trainer.student
    assert len(logs) == 1
    assert "torch.compile failed (RuntimeError: no working C++ compiler)" in logs[0]
    trainer.step(_images(), None, **STEP)  # later steps run eagerly, no second message
    assert len(logs) == 1


def test_errors_after_a_good_step_are_not_swallowed():
    trainer = _trainer(compile=False, log=print)
    trainer.step(_images(), None, **STEP)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        trainer.step(_images(), None, **{**STEP, "teacher_temp": 0.0})
