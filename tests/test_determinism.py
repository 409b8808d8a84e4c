"""``run --deterministic`` on CUDA: no operator of a training step or of the evaluation
may be one that PyTorch refuses under ``torch.use_deterministic_algorithms(True)`` on CUDA.

A CPU run cannot raise those errors (the checks are in the CUDA kernels), so the test
records every ATen operator dispatched, backward included, and compares the set with
PyTorch's list of operators that throw on CUDA in deterministic mode (the
``torch.use_deterministic_algorithms`` documentation, torch 2.3 to 2.14). Operators with a
deterministic CUDA kernel (``scatter_add_``, ``index_add_``, ``index_put_`` with
accumulate, ``cumsum``, ``nll_loss`` on 2-D logits) are allowed. The bicubic positional-
embedding resize used to run ``upsample_bicubic2d_backward`` here, which this catches.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinobench.config import OFFICIAL, SEED
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.eval.attention import cls_attention_maps
from dinobench.eval.features import extract_features
from dinobench.eval.knn import knn_classify
from dinobench.eval.supervised import SupervisedConfig, train_supervised
from dinobench.vit import ViTConfig

# Operators with no deterministic CUDA kernel (forward, or backward where named so).
THROWS_ON_CUDA = {
    "avg_pool3d_backward", "adaptive_avg_pool2d_backward", "_adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "_upsample_bilinear2d_aa_backward", "upsample_bicubic2d_backward",
    "_upsample_bicubic2d_aa_backward", "upsample_trilinear3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward",
    "_embedding_bag_dense_backward", "put_", "put", "histc", "grid_sampler_2d_backward",
    "grid_sampler_3d_backward", "cudnn_grid_sampler_backward",
}


def _throws(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in THROWS_ON_CUDA:
        return True
    if name in ("median", "nanmedian"):  # only the overloads that return indices
        return func._overloadname in ("dim", "dim_values", "names_dim")
    if name == "bincount":  # only with weights
        return len(args) > 1 and args[1] is not None or kwargs.get("weights") is not None
    if name.startswith("scatter_reduce"):
        return "prod" in args or kwargs.get("reduce") == "prod"
    return False


class OpRecorder(TorchDispatchMode):
    """Every ATen operator dispatched inside the block, and those that would throw."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.throwing: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func))
        if _throws(func, args, kwargs):
            self.throwing.add(str(func))
        return func(*args, **kwargs)


def _trainer(recipe, channels: int = 3) -> DINOTrainer:
    recipe = recipe.replace(dim=32, depth=2, heads=2, mlp_dim=64, batch_size=4, n_local=2,
                            out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8,
                            drop_path=0.1).validate()
    cfg = ViTConfig(image_size=32, grid=8, in_chans=channels, dim=32, depth=2, heads=2,
                    mlp_dim=64)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, (0.5,) * channels, (0.25,) * channels)
    return DINOTrainer(recipe, cfg, crop, progress=False, log=lambda s: None)


def test_the_recorder_sees_backward_operators():
    """The check can fail: F.interpolate's bicubic backward is seen and flagged."""
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with OpRecorder() as rec:
        torch.nn.functional.interpolate(x, size=(4, 4), mode="bicubic").sum().backward()
    assert "aten.upsample_bicubic2d_backward.default" in rec.throwing


@pytest.mark.parametrize("recipe", [SEED, OFFICIAL], ids=["seed", "official"])
def test_training_step_uses_no_operator_that_throws_when_deterministic(recipe):
    trainer = _trainer(recipe)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    kw = {"lr": 1e-3, "wd": 0.04, "momentum": 0.99, "teacher_temp": 0.05,
          "freeze_last_layer": False}
    with OpRecorder() as rec:
        trainer.step(images, gen, **kw)
    # The local crops (4x4 patches on an 8x8 table) went through the resize's backward.
    assert any(op.startswith("aten.mm") for op in rec.ops)
    assert not rec.throwing, sorted(rec.throwing)


def test_evaluation_uses_no_operator_that_throws_when_deterministic():
    trainer = _trainer(SEED)
    backbone = trainer.teacher.backbone
    images = torch.randint(0, 256, (12, 3, 28, 28), dtype=torch.uint8)  # resized to 32
    sup = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    crop = trainer.crop_cfg
    with OpRecorder() as rec:
        feats = extract_features(backbone, images, crop.mean, crop.std, batch_size=5)
        knn_classify(feats[:8], labels[:8], feats[8:], k=3, num_classes=3)
        cls_attention_maps(backbone, images[:4], crop.mean, crop.std)
        train_supervised(trainer.vit_cfg, crop, sup, labels, sup[:4], labels[:4],
                         num_classes=3, cfg=SupervisedConfig(epochs=1, batch_size=4,
                                                             warmup_epochs=0))
    assert not rec.throwing, sorted(rec.throwing)
