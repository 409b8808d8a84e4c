"""The trainer's optimisation details and its state: per-tensor gradient clipping,
weight decay on matrices only, and a state_dict that holds everything training changes."""

from __future__ import annotations

import math

import pytest
import torch

from dinobench.dino.clip import clip_per_tensor_
from dinobench.dino.model_setup import param_groups
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer, Interrupted, resolved_precision
from dinobench.errors import ConfigError
from helpers import tiny_trainer


def _assert_same_state(a, b, where="state"):
    """Two trainer states equal in every entry: tensors bit for bit, the rest by ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _count_steps(trainer) -> dict:
    """Count the optimisation steps ``trainer`` takes from now on, in ``["n"]``."""
    counted, step = {"n": 0}, trainer.step

    def counting_step(*args, **kwargs):
        counted["n"] += 1
        return step(*args, **kwargs)

    trainer.step = counting_step
    return counted


def test_clip_per_tensor_matches_a_loop_over_tensors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 7)]
    for p, scale in zip(params, (0.1, 10.0, 100.0)):
        p.grad = torch.randn(p.shape, dtype=torch.float64).float() * scale
    expected = []
    for p in params:  # each tensor on its own: g * min(1, c / (||g|| + 1e-6))
        g = p.grad.double()
        norm = float(torch.sqrt((g * g).sum()))
        expected.append(g * min(1.0, 3.0 / (norm + 1e-6)))
    small = params[0].grad.clone()
    assert float(small.double().norm()) + 1e-6 < 3.0
    clip_per_tensor_(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-7)
    # A small gradient is left alone, bit for bit (its factor is exactly 1); globally
    # clipped, it would have shrunk too.
    assert torch.equal(params[0].grad, small)


def test_weight_decay_only_on_weight_matrices(tiny_recipe, tiny_vit_cfg):
    crop = MultiCropConfig.from_recipe(tiny_recipe, 16, 4, (0.5,), (0.25,))
    trainer = DINOTrainer(tiny_recipe, tiny_vit_cfg, crop, progress=False, log=lambda m: None)
    groups = param_groups(trainer.student)
    ids = {id(p): name for name, p in trainer.student.named_parameters()}
    decayed = {ids[id(p)] for p in groups[0]["params"]}
    expected = {name for name, p in trainer.student.named_parameters()
                if p.ndim >= 2 and name.split(".")[-1] not in ("cls_token", "pos_embed")}
    assert decayed == expected
    assert "backbone.patch_embed.weight" in decayed and "head.last_layer_v" in decayed
    assert not any(n.endswith((".bias", "norm.weight", "cls_token", "pos_embed"))
                   for n in decayed)
    assert groups[1]["weight_decay"] == 0.0


def test_a_state_saved_mid_epoch_continues_exactly(tiny_recipe, tiny_vit_cfg):
    recipe = tiny_recipe.replace(epochs=3, drop_path=0.2)  # drop path: the global RNG
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)
    straight = tiny_trainer(recipe, tiny_vit_cfg, seed=3)
    straight.fit(images)

    saved = {}
    calls = {"n": 0}

    def stop_after_7_steps():
        calls["n"] += 1
        return calls["n"] > 7  # 5 steps an epoch: stops inside the second epoch

    first = tiny_trainer(recipe, tiny_vit_cfg, seed=3)
    try:
        first.fit(images, checkpoint=lambda tr: saved.update(tr.state_dict()),
                  should_stop=stop_after_7_steps)
    except Interrupted:
        pass
    assert saved["epoch"] == 1 and saved["pos"] == 2
    second = tiny_trainer(recipe, tiny_vit_cfg, seed=3)  # a fresh process, in effect
    second.load_state_dict(saved)
    # A resume, not a restart (the trainer seeds itself, so a restart ends the same):
    # the loaded trainer holds the saved state - weights, optimizer moments, center,
    # place in the epoch, every random stream - and takes only the 15 - 7 steps left.
    assert (second.epoch, second.step_count, second.pos) == (1, 7, 2)  # epoch 2, from 0
    _assert_same_state(second.state_dict(), saved)
    counted = _count_steps(second)
    second.fit(images)
    assert counted["n"] == 15 - 7 and second.step_count == 15

    for name, t in straight.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[name], t), name
    for name, t in straight.teacher.state_dict().items():
        assert torch.equal(second.teacher.state_dict()[name], t), name
    assert torch.equal(second.center, straight.center)
    # The values summed over the interrupted epoch: the loss and the collapse diagnostics.
    summed = ("loss", "kl", "teacher_entropy", "marginal_entropy", "outputs_used")
    assert ([[h[k] for k in summed] for h in second.history]
            == [[h[k] for k in summed] for h in straight.history])


def test_state_dict_covers_every_attribute_training_changes(tiny_recipe, tiny_vit_cfg):
    """A new attribute that training mutates must be saved, or be listed here as one that
    is rebuilt from the configuration. iBOT on, so its patch center exists."""
    trainer = tiny_trainer(tiny_recipe.replace(ibot_weight=1.0), tiny_vit_cfg, seed=3)
    rebuilt = {"recipe", "vit_cfg", "crop_cfg", "device", "seed", "progress", "log",
               "log_path", "on_epoch_end", "dist", "local_batch", "student_fwd",
               "teacher_fwd", "_eager_fwd", "_compile_unproven", "multicrop", "autocast"}
    saved_as = {"student": "student", "teacher": "teacher", "optimizer": "optimizer",
                "center": "center", "epoch": "epoch", "step_count": "step", "pos": "pos",
                "order": "order", "order_gen": "order_rng", "history": "history",
                "train_seconds": "train_seconds", "aug_gen": "ranks", "stats": "ranks",
                "patch_center": "patch_center"}
    state = trainer.state_dict()
    for attr in vars(trainer):
        assert attr in rebuilt or attr in saved_as, f"{attr} is neither saved nor rebuilt"
        if attr in saved_as:
            assert saved_as[attr] in state
    # The epoch's running sums and the non-finite-loss watch: in each rank's entry.
    stats_rebuilt = {"out_dim", "device", "dist",
                     "step_t"}  # step_t is re-derived from the saved step count
    stats_saved = {"sums", "first_bad_step"}
    for attr in vars(trainer.stats):
        assert attr in stats_rebuilt or attr in stats_saved, (
            f"stats.{attr} is neither saved nor rebuilt")
    # Checkpoints written earlier load only while a rank's entry keeps these keys.
    assert set(state["ranks"][0]) == {"aug", "torch", *stats_saved}  # a CPU run: no "cuda"


class FakeClock:
    """A ``time`` stand-in for the trainer: each training step takes exactly one second,
    and whatever else advances it is said by the test, so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _fake_clock(monkeypatch) -> FakeClock:
    """Put a :class:`FakeClock` in the trainer's place of ``time``; one second a step."""
    import dinobench.dino.train as train_module

    clock = FakeClock()
    monkeypatch.setattr(train_module, "time", clock)
    step = DINOTrainer.step

    def one_second_step(self, *args, **kwargs):
        clock.now += 1.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DINOTrainer, "step", one_second_step)
    return clock


def _timed_trainer(recipe, cfg, hook=None):
    crop = MultiCropConfig.from_recipe(recipe, 16, 4, (0.5,), (0.25,))
    return DINOTrainer(recipe, cfg, crop, seed=3, progress=False, log=lambda m: None,
                       on_epoch_end=hook)


def test_records_count_training_time_apart_from_evaluation_and_checkpoints(
        tiny_recipe, tiny_vit_cfg, monkeypatch):
    clock, calls = _fake_clock(monkeypatch), []

    def slow_evaluation(epoch, teacher):
        clock.now += 100.0  # evaluation time must not count as training
        calls.append(epoch)
        return {"val_knn_top1": 50.0}

    def slow_checkpoint(trainer):
        clock.now += 1000.0

    recipe = tiny_recipe.replace(epochs=3)
    trainer = _timed_trainer(recipe, tiny_vit_cfg, slow_evaluation)
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)  # 5 steps an epoch
    result = trainer.fit(images, checkpoint=slow_checkpoint, checkpoint_every=1)
    h = result.history
    assert [r["train_seconds"] for r in h] == [5.0, 10.0, 15.0]
    assert [r["eval_seconds"] for r in h] == [100.0] * 3
    assert [r["images_seen"] for r in h] == [5 * 8, 10 * 8, 15 * 8]
    assert calls == [0, 1, 2] and not result.budget_stop


def test_a_time_budget_cuts_training_and_a_larger_one_continues_exactly(
        tiny_recipe, tiny_vit_cfg, monkeypatch):
    recipe = tiny_recipe.replace(epochs=3, drop_path=0.2)
    images = torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8)  # 5 steps an epoch
    _fake_clock(monkeypatch)
    finals = []

    def hook(epoch, teacher, final=False):
        finals.append((epoch, final))
        return {"val_knn_top1": 10.0 * (epoch + 1)}

    straight = _timed_trainer(recipe, tiny_vit_cfg, hook)
    straight.fit(images)

    saved = {}
    cut = _timed_trainer(recipe, tiny_vit_cfg, hook)
    finals.clear()
    result = cut.fit(images, checkpoint=lambda tr: saved.update(tr.state_dict()),
                     max_seconds=7.5)
    # 7.5 s is passed by step 8, the third of epoch 2: training ends there, is
    # evaluated there (final=True) and checkpointed, inside the epoch.
    assert result.budget_stop and cut.step_count == 8
    last = result.history[-1]
    assert (last["epoch"], last["step"], last["train_seconds"]) == (2, 8, 8.0)
    assert last["images_seen"] == 8 * 8 and math.isfinite(last["loss"])
    assert last["budget_stop"] and not any("budget_stop" in r for r in result.history[:-1])
    assert finals == [(0, False), (1, True)]
    assert saved["step"] == 8 and saved["pos"] == 3 and saved["train_seconds"] == 8.0

    same = _timed_trainer(recipe, tiny_vit_cfg, hook)
    same.load_state_dict(saved)
    _assert_same_state(same.state_dict(), saved)
    counted = _count_steps(same)
    again = same.fit(images, max_seconds=7.5)  # its budget is spent: nothing to do
    assert again.budget_stop and same.step_count == 8 and len(again.history) == 2
    assert counted["n"] == 0

    more = _timed_trainer(recipe, tiny_vit_cfg, hook)
    more.load_state_dict(saved)
    # A resume, not a restart: the saved state, then only the 15 - 8 steps left.
    assert (more.epoch, more.step_count, more.pos) == (1, 8, 3)  # epoch 2, counted from 0
    _assert_same_state(more.state_dict(), saved)
    counted = _count_steps(more)
    done = more.fit(images, max_seconds=100.0)
    assert not done.budget_stop and more.step_count == 15 and counted["n"] == 15 - 8
    assert done.history[-1]["train_seconds"] == 15.0  # continued from the saved 8 s
    for name, t in straight.student.state_dict().items():
        assert torch.equal(more.student.state_dict()[name], t), name
    # The continued epoch 2 averages all of its steps, as the uncut run did.
    full = [r for r in done.history if r["step"] % 5 == 0]
    assert [r["loss"] for r in full] == [r["loss"] for r in straight.history]


def test_precision_bf16_runs_the_forward_passes_in_bf16_and_keeps_the_state_float32(
        tiny_recipe, tiny_vit_cfg):
    crop = MultiCropConfig.from_recipe(tiny_recipe, 16, 4, (0.5,), (0.25,))
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = {}
    for precision in ("fp32", "bf16"):
        trainer = DINOTrainer(tiny_recipe, tiny_vit_cfg, crop, seed=3, progress=False,
                              log=lambda m: None, precision=precision)
        crops = trainer.multicrop(images, torch.Generator().manual_seed(1))
        teacher_out, targets, loss, _ = trainer._forward_backward(crops, 0.04)
        out[precision] = (teacher_out, targets, loss)
        trainer.step(images, torch.Generator().manual_seed(1), lr=1e-3, wd=0.04,
                     momentum=0.99, teacher_temp=0.04, freeze_last_layer=False)
        assert trainer.center.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in trainer.teacher.parameters())
    assert out["fp32"][0].dtype == torch.float32 and out["bf16"][0].dtype == torch.bfloat16
    assert out["bf16"][1].dtype == out["bf16"][2].dtype == torch.float32  # loss in float32
    # Same weights and crops: bf16 rounding (8 bits of mantissa) moves the loss a little.
    fp32, bf16 = (out[p][2].detach().item() for p in ("fp32", "bf16"))
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.02 * abs(fp32)


def test_precision_names_resolve_per_device_and_a_bad_one_is_refused():
    assert resolved_precision("auto", torch.device("cpu")) == "fp32"
    assert resolved_precision("auto", torch.device("cuda")) == "bf16"
    assert resolved_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="--precision must be one of auto, bf16, fp32"):
        resolved_precision("fp16", torch.device("cpu"))
