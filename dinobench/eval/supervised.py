"""The labelled baseline: the same ViT trained from scratch with cross-entropy only.

The seed compared DINO with a ViT trained on STL-10's 5,000 labelled images and saw the
latter overfit early (its Figs. 5 and 6). Here that ViT has the DINO backbone's shape and
sees the same augmentation as DINO's teacher: each image gives ``views`` global crops of
the recipe's multi-crop (random resized crop, flip, colour jitter, grey, blur, solarise on
the second view), batched on the device. AdamW with a linear warm-up and a cosine decay;
weight decay on weight matrices only, as in the DINO trainer.

Test accuracy is measured every ``eval_every`` epochs on clean test images to draw the
learning curve only; nothing is selected on it (the reported number is the last epoch's).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..dino.model_setup import param_groups
from ..dino.multicrop import MultiCrop, MultiCropConfig
from ..dino.schedules import cosine_schedule
from ..errors import ConfigError
from ..vit import ViT, ViTConfig
from .features import eval_precision, to_model_input


@dataclass(frozen=True)
class SupervisedConfig:
    epochs: int = 100  # passes over the labelled images
    batch_size: int = 128  # images per step (capped at the number of labelled images)
    lr: float = 5e-4  # peak learning rate per 256 images, scaled linearly with the batch
    min_lr: float = 1e-6  # end of the cosine decay
    warmup_epochs: int = 10  # linear warm-up from 0
    weight_decay: float = 0.05  # AdamW decay on weight matrices
    drop_path: float = 0.1  # stochastic depth, as DINO's student
    label_smoothing: float = 0.0  # plain cross-entropy by default
    views: int = 2  # global crops per image per step (DINO's teacher sees 2)
    eval_every: int = 1  # epochs between test-accuracy points of the learning curve
    # Image draws per epoch; None: one pass over the labelled images. The seed drew
    # 50,000 per epoch from STL-10's 5,000 labels, so that an epoch costs as much as a
    # DINO epoch over 50,000 unlabelled images (the same augmentation budget).
    images_per_epoch: int | None = None

    def validate(self) -> SupervisedConfig:
        if self.images_per_epoch is not None and self.images_per_epoch < 1:
            raise ConfigError(f"supervised images_per_epoch must be at least 1, got "
                              f"{self.images_per_epoch}")
        for f in ("epochs", "batch_size", "views", "eval_every"):
            if getattr(self, f) < 1:
                raise ConfigError(f"supervised {f} must be at least 1, got {getattr(self, f)}")
        if self.lr <= 0 or self.warmup_epochs < 0 or not 0 <= self.drop_path < 1:
            raise ConfigError("supervised lr must be positive, warmup_epochs >= 0 and "
                              f"drop_path in [0, 1); got {self.lr}, {self.warmup_epochs}, "
                              f"{self.drop_path}")
        return self


class SupervisedViT(nn.Module):
    """Backbone + linear classifier on the CLS feature."""

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        self.backbone = ViT(cfg)
        self.classifier = nn.Linear(cfg.dim, num_classes)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


@dataclass
class SupervisedResult:
    model: SupervisedViT
    history: list[dict] = field(default_factory=list)  # one record per epoch
    seconds: float = 0.0

    @property
    def test_top1(self) -> float:
        return self.history[-1]["test_top1"] if self.history else math.nan


@torch.no_grad()
def classify_top1(model: SupervisedViT, images: torch.Tensor, labels: torch.Tensor,
                  mean, std, *, batch_size: int = 512) -> float:
    """Top-1 (%) on clean ``uint8`` images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    size = model.backbone.cfg.image_size
    with eval_precision(device):
        for i in range(0, images.shape[0], batch_size):
            x = to_model_input(images[i:i + batch_size].to(device), mean, std, size)
            pred = model(x).argmax(dim=1)
            correct += (pred == labels[i:i + batch_size].to(device)).sum()
    model.train(was_training)
    return 100.0 * correct.item() / max(images.shape[0], 1)


def train_supervised(vit_cfg: ViTConfig, crop_cfg: MultiCropConfig,
                     train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, *,
                     num_classes: int, cfg: SupervisedConfig = SupervisedConfig(),
                     device: torch.device | str = "cpu", seed: int = 0,
                     log: Callable[[str], None] | None = None) -> SupervisedResult:
    """Train a :class:`SupervisedViT` on the labelled ``uint8`` images; one history record
    per epoch: ``epoch``, ``train_loss``, ``train_top1`` (on the augmented views),
    ``test_top1`` (None between ``eval_every`` points; always set at the last epoch),
    ``lr``, ``seconds``."""
    cfg = cfg.validate()
    device = torch.device(device)
    n = train_images.shape[0]
    if n == 0 or train_labels.shape != (n,):
        raise ConfigError(f"need labelled images and one label each, got {n} images and "
                          f"labels of shape {tuple(train_labels.shape)}")
    torch.manual_seed(seed)
    model = SupervisedViT(dataclasses.replace(vit_cfg, drop_path=cfg.drop_path),
                          num_classes).to(device)
    crops = MultiCrop(dataclasses.replace(crop_cfg, n_global=cfg.views, n_local=0))
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model), lr=0.0, weight_decay=cfg.weight_decay,
                            **({"fused": True} if cuda else {}))
    per_epoch = cfg.images_per_epoch or n
    batch = min(cfg.batch_size, per_epoch)
    steps = per_epoch // batch  # the last partial batch is dropped, as in the DINO trainer
    passes = -(-per_epoch // n)  # whole permutations needed to draw per_epoch images
    total = cfg.epochs * steps
    lr = cosine_schedule(cfg.lr * batch / 256, cfg.min_lr, total,
                         min(cfg.warmup_epochs * steps, total))
    images, labels = train_images.to(device), train_labels.to(device).long()
    aug_gen = torch.Generator(device).manual_seed(seed + 1)
    order_gen = torch.Generator().manual_seed(seed + 2)
    result = SupervisedResult(model)
    t_start = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.cat([torch.randperm(n, generator=order_gen)
                           for _ in range(passes)])[:per_epoch].to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            x = crops(images[idx], aug_gen)[0]  # (views * B, C, S, S), view-major
            y = labels[idx].repeat(cfg.views)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = float(lr[step])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            step += 1
        last = epoch == cfg.epochs - 1
        test = (classify_top1(model, test_images, test_labels, crop_cfg.mean, crop_cfg.std)
                if last or (epoch + 1) % cfg.eval_every == 0 else None)
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / steps,
                  "train_top1": 100.0 * correct.item() / (steps * batch * cfg.views),
                  "test_top1": test, "lr": float(lr[step - 1]),
                  "seconds": time.perf_counter() - t_epoch}
        result.history.append(record)
        if log:
            log(f"supervised epoch {epoch + 1:>4}/{cfg.epochs}  loss "
                f"{record['train_loss']:.4f}  train {record['train_top1']:.2f}%"
                + (f"  test {test:.2f}%" if test is not None else ""))
    result.seconds = time.perf_counter() - t_start
    return result
