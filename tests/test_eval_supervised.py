"""The supervised ViT baseline: it learns a trivially learnable task, curves are whole."""

import math

import pytest
import torch

from dinobench.dino.multicrop import MultiCropConfig
from dinobench.errors import ConfigError
from dinobench.eval.features import to_model_input
from dinobench.eval.supervised import (
    SupervisedConfig,
    SupervisedViT,
    classify_top1,
    train_supervised,
)
from dinobench.vit import ViTConfig

CFG = ViTConfig(image_size=8, grid=2, in_chans=1, dim=16, depth=1, heads=2, mlp_dim=32)
CROPS = MultiCropConfig(global_size=8, local_size=4, mean=(0.5,), std=(0.3,))


def dark_or_bright(n: int, seed: int):
    """Class 0: dark images, class 1: bright ones (any crop shows the class)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat(n // 2)
    base = torch.where(y == 1, 200, 40).view(-1, 1, 1, 1)
    noise = torch.randint(-20, 21, (len(y), 1, 8, 8), generator=gen)
    return (base + noise).to(torch.uint8), y


def test_learns_a_separable_task_and_records_curves():
    x, y = dark_or_bright(64, 0)
    xt, yt = dark_or_bright(32, 1)
    cfg = SupervisedConfig(epochs=6, batch_size=16, lr=4e-3, warmup_epochs=1,
                           drop_path=0.0, eval_every=2)
    r = train_supervised(CFG, CROPS, x, y, xt, yt, num_classes=2, cfg=cfg, seed=0)
    h = r.history
    assert [e["epoch"] for e in h] == list(range(1, 7))
    assert [e["test_top1"] is None for e in h] == [True, False, True, False, True, False]
    assert r.test_top1 == 100.0 == h[-1]["test_top1"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert all(math.isfinite(e["train_loss"]) and 0 <= e["train_top1"] <= 100 for e in h)
    # The model is the same shape as the DINO backbone, with a linear classifier.
    assert r.model.backbone.cfg.dim == CFG.dim and r.model.classifier.out_features == 2


def test_training_is_seeded():
    x, y = dark_or_bright(32, 2)
    cfg = SupervisedConfig(epochs=2, batch_size=16, warmup_epochs=0)
    a = train_supervised(CFG, CROPS, x, y, x, y, num_classes=2, cfg=cfg, seed=3)
    b = train_supervised(CFG, CROPS, x, y, x, y, num_classes=2, cfg=cfg, seed=3)
    assert [e["train_loss"] for e in a.history] == [e["train_loss"] for e in b.history]


def test_classify_top1_matches_a_loop():
    torch.manual_seed(0)
    model = SupervisedViT(CFG, 3).eval()
    x = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    hits = 0
    with torch.no_grad():
        for xi, yi in zip(x, y):
            logits = model(to_model_input(xi[None], (0.5,), (0.3,), 8))[0]
            hits += int(logits.argmax().item() == yi.item())
    assert classify_top1(model, x, y, (0.5,), (0.3,), batch_size=3) == pytest.approx(
        100 * hits / 7)


def test_bad_settings_are_rejected():
    x, y = dark_or_bright(4, 0)
    with pytest.raises(ConfigError, match="epochs"):
        train_supervised(CFG, CROPS, x, y, x, y, num_classes=2,
                         cfg=SupervisedConfig(epochs=0))
    with pytest.raises(ConfigError, match="one label each"):
        train_supervised(CFG, CROPS, x, y[:2], x, y, num_classes=2)
