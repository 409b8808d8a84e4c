"""The DINO training loop: student and EMA teacher, centering, sharpening, schedules.

One code path for CPU and GPU. Per step, everything stays on the device: batch indexing,
multi-crop, forward/backward, optimizer, EMA, centering and the running sums that feed
the log. The host reads those sums once per epoch (one synchronisation), so the GPU never
waits on Python inside an epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Recipe
from ..errors import ConfigError
from ..vit import ViT, ViTConfig
from .center import update_center
from .ema import ema_update_
from .heads import DINOModel, build_head
from .loss import dino_loss, entropy, teacher_probs
from .multicrop import MultiCrop, MultiCropConfig
from .schedules import cosine_schedule, teacher_temp_schedule


def build_student_teacher(recipe: Recipe, vit_cfg: ViTConfig) -> tuple[DINOModel, DINOModel]:
    """Student and teacher from the same initialisation. Only the student uses
    stochastic depth; the teacher is never trained by gradient."""
    student = DINOModel(
        ViT(dataclasses.replace(vit_cfg, drop_path=recipe.drop_path)),
        build_head(recipe.head, vit_cfg.dim, recipe.out_dim, recipe.head_hidden_dim,
                   recipe.head_bottleneck_dim),
    )
    teacher = copy.deepcopy(student)
    for block in teacher.backbone.blocks:
        block.drop_path.p = 0.0
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, the CLS token or the
    positional embeddings (which are vectors of the token space, not maps)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False,
                                               "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_tensor_(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient tensor to norm at most ``max_norm`` (the DINO reference code
    clips per parameter, not globally). Fused, no host synchronisation."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    scale = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scale)


@dataclass
class TrainResult:
    student: DINOModel
    teacher: DINOModel
    center: torch.Tensor
    history: list[dict] = field(default_factory=list)  # one record per epoch
    seconds: float = 0.0


class DINOTrainer:
    """Trains DINO on a ``uint8`` image tensor. ``fit`` returns the student and teacher."""

    def __init__(self, recipe: Recipe, vit_cfg: ViTConfig, crop_cfg: MultiCropConfig, *,
                 device: torch.device | str = "cpu", seed: int = 0, compile: bool = False,
                 log_path: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = print,
                 on_epoch_end: Callable[[int, DINOModel], dict | None] | None = None):
        self.recipe = recipe.validate()
        self.vit_cfg = vit_cfg
        self.device = torch.device(device)
        self.seed = seed
        self.log_path = Path(log_path) if log_path else None
        self.progress = progress
        self.log = log
        self.on_epoch_end = on_epoch_end
        torch.manual_seed(seed)
        self.student, self.teacher = build_student_teacher(recipe, vit_cfg)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.multicrop = MultiCrop(crop_cfg)
        self.center = torch.zeros(1, recipe.out_dim, device=self.device)
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0,
                                           **({"fused": True} if cuda else {}))
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda)
        self.student_fwd = self.student
        self.teacher_fwd = self.teacher
        if compile:
            self.student_fwd = torch.compile(self.student, dynamic=False)
            self.teacher_fwd = torch.compile(self.teacher, dynamic=False)

    def schedules(self, steps_per_epoch: int) -> dict:
        r = self.recipe
        total = r.epochs * steps_per_epoch
        peak_lr = r.lr * r.batch_size / 256  # linear scaling rule
        warmup = min(r.warmup_epochs * steps_per_epoch, total)
        return {
            "lr": cosine_schedule(peak_lr, r.min_lr, total, warmup),
            "wd": cosine_schedule(r.weight_decay, r.weight_decay_end, total),
            "momentum": cosine_schedule(r.teacher_momentum, 1.0, total),
            "teacher_temp": teacher_temp_schedule(r.warmup_teacher_temp, r.teacher_temp,
                                                  r.warmup_teacher_temp_epochs, r.epochs),
        }

    def step(self, batch: torch.Tensor, gen: torch.Generator, lr: float, wd: float,
             momentum: float, teacher_temp: float, freeze_last_layer: bool) -> dict:
        """One DINO step on a ``uint8`` batch. Returns device tensors (no sync)."""
        r = self.recipe
        crops = self.multicrop(batch, gen)
        with self.autocast:
            teacher_out = self.teacher_fwd(crops[:1])  # global views only
            student_out = self.student_fwd(crops)
        loss = dino_loss(student_out, teacher_out, self.center, student_temp=r.student_temp,
                         teacher_temp=teacher_temp, n_global=r.n_global)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip_per_tensor_(params, r.clip_grad)
        if freeze_last_layer:
            for p in self.student.head.last_layer_parameters():
                p.grad = None
        self.optimizer.step()
        ema_update_(self.teacher, self.student, momentum)
        with torch.no_grad():
            h_teacher = entropy(teacher_probs(teacher_out, self.center, teacher_temp))
        self.center = update_center(self.center, teacher_out, r.center_momentum)
        return {"loss": loss.detach(), "teacher_entropy": h_teacher}

    def fit(self, images: torch.Tensor) -> TrainResult:
        r = self.recipe
        n = images.shape[0]
        if n < r.batch_size:
            raise ConfigError(f"--batch-size {r.batch_size} exceeds the {n} training images; "
                              "lower --batch-size")
        images = images.to(self.device)
        steps_per_epoch = n // r.batch_size  # drop the last partial batch
        sched = self.schedules(steps_per_epoch)
        aug_gen = torch.Generator(self.device).manual_seed(self.seed + 1)
        order_gen = torch.Generator().manual_seed(self.seed + 2)
        result = TrainResult(self.student, self.teacher, self.center)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
        t_start = time.perf_counter()
        step = 0
        for epoch in range(r.epochs):
            self.student.train()
            t_epoch = time.perf_counter()
            order = torch.randperm(n, generator=order_gen).to(self.device)
            sums = {"loss": torch.zeros((), device=self.device),
                    "teacher_entropy": torch.zeros((), device=self.device)}
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{r.epochs}",
                       leave=False, disable=not self.progress or None, dynamic_ncols=True)
            for i in bar:
                batch = images[order[i * r.batch_size:(i + 1) * r.batch_size]]
                out = self.step(batch, aug_gen, float(sched["lr"][step]),
                                float(sched["wd"][step]), float(sched["momentum"][step]),
                                float(sched["teacher_temp"][epoch]),
                                epoch < r.freeze_last_layer_epochs)
                for k in sums:
                    sums[k] += out[k]
                step += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t_epoch
            record = self._epoch_record(epoch, step, sums, steps_per_epoch, sched, seconds)
            if self.on_epoch_end is not None:
                record.update(self.on_epoch_end(epoch, self.teacher) or {})
            result.history.append(record)
            self._write_log(record)
        result.center = self.center
        result.seconds = time.perf_counter() - t_start
        return result

    def _epoch_record(self, epoch, step, sums, steps, sched, seconds) -> dict:
        loss = sums["loss"].item() / steps
        h = sums["teacher_entropy"].item() / steps
        return {
            "epoch": epoch + 1,
            "step": step,
            "loss": loss,
            # Mean over pairs of KL(teacher || student) = cross-entropy - teacher entropy,
            # because every teacher view enters the same number of pairs.
            "kl": loss - h,
            "teacher_entropy": h,
            "log_k": math.log(self.recipe.out_dim),
            "lr": float(sched["lr"][step - 1]),
            "weight_decay": float(sched["wd"][step - 1]),
            "teacher_momentum": float(sched["momentum"][step - 1]),
            "teacher_temp": float(sched["teacher_temp"][epoch]),
            "images_per_s": steps * self.recipe.batch_size / seconds,
            "seconds": seconds,
        }

    def _write_log(self, rec: dict) -> None:
        self.log(f"epoch {rec['epoch']:>4}/{self.recipe.epochs}  loss {rec['loss']:.4f}  "
                 f"H(teacher) {rec['teacher_entropy']:.3f}/{rec['log_k']:.3f}  "
                 f"KL {rec['kl']:.4f}  lr {rec['lr']:.2e}  "
                 f"{rec['images_per_s']:,.0f} img/s"
                 + (f"  knn {rec['knn_top1']:.2f}%" if "knn_top1" in rec else ""))
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
