"""The model and the whole step: multi-crop, ViT forward, attention maps, the DINO step.

Groups put each lever beside its baseline in the same run:

- ``multicrop``: batched device augmentation against the reference's per-image PIL
  transforms (run here in one process: the work of one loader worker);
- ``vit-forward-global`` / ``vit-forward-local``: fused attention (SDPA) against the
  explicit path;
- ``step``: :meth:`DINOTrainer.step` (augmentation included) against the reference step
  (explicit attention, fp16 + scaler on CUDA, ``loss.item()``) on crops already made.
"""

from __future__ import annotations

import pytest
import torch

from dinobench.reference import ReferenceDataset, ReferenceMultiCrop, ReferenceTrainer


@pytest.mark.benchmark(group="multicrop")
@pytest.mark.parametrize("impl", ["device-batched", "pil-per-image"])
def test_multicrop(timed, env, trainer, images, impl):
    if impl == "device-batched":
        gen = torch.Generator(env.device).manual_seed(0)
        timed(lambda: trainer.multicrop(images, gen))
        return
    ds = ReferenceDataset(images.cpu(), ReferenceMultiCrop(trainer.multicrop.cfg,
                                                           images.shape[1]))
    timed(lambda: [ds[i] for i in range(len(ds))], rounds=max(3, env.rounds // 4))


def _backbone(trainer, path):
    backbone = trainer.teacher.backbone
    return backbone if path == "sdpa" else backbone.forward_all_explicit


@pytest.mark.benchmark(group="vit-forward-global")
@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_vit_forward_global(timed, env, trainer, crops, path):
    fn = _backbone(trainer, path)

    @torch.no_grad()
    def run():
        with env.autocast():
            return fn(crops[0])

    timed(run)


@pytest.mark.benchmark(group="vit-forward-local")
@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_vit_forward_local(timed, env, trainer, crops, path):
    fn = _backbone(trainer, path)

    @torch.no_grad()
    def run():
        with env.autocast():
            return fn(crops[1])

    timed(run)


@pytest.mark.benchmark(group="attention-maps")
def test_attention_extraction(timed, env, trainer, crops):
    backbone = trainer.teacher.backbone

    @torch.no_grad()
    def run():
        with env.autocast():
            return backbone.cls_attention(crops[0][:env.batch])

    timed(run)


@pytest.fixture(scope="module")
def step_args(trainer):
    r = trainer.recipe
    return {"lr": r.lr * r.batch_size / 256, "wd": r.weight_decay,
            "momentum": r.teacher_momentum, "teacher_temp": r.teacher_temp,
            "freeze_last_layer": False}


@pytest.mark.benchmark(group="step")
def test_full_step(timed, env, trainer, images, step_args):
    gen = torch.Generator(env.device).manual_seed(2)
    timed(lambda: trainer.step(images, gen, **step_args))


@pytest.mark.benchmark(group="step")
def test_reference_step_on_ready_crops(timed, env, trainer, crops, step_args):
    ref = ReferenceTrainer(trainer.recipe, trainer.vit_cfg, device=env.device)
    timed(lambda: ref.step(crops, **step_args))
