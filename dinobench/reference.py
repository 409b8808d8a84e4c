"""The reference pipeline: the same DINO step, fed and run the way the DINO reference code
does it. ``dinobench bench --compare`` times it beside :class:`~dinobench.dino.train.DINOTrainer`
in the same process, on the same device.

What differs from dinobench (and only this):

- augmentation per image on PIL images with torchvision's v1 transforms, in DataLoader
  worker processes; the crops are collated on the host and copied to the device;
- attention through the explicit path (the ``(N x N)`` weights are materialised and
  soft-maxed), every module eager;
- fp16 autocast with a gradient scaler on CUDA (fp32 on CPU), a ``loss.item()`` check per
  step (one host synchronisation), AdamW with its default (non-fused) implementation.

What is shared: the ViT and head shapes and initialisation, :func:`dino_loss`,
:func:`update_center`, :func:`ema_update_`, per-tensor gradient clipping and the parameter
groups. Crop geometry and colour follow the recipe with the same probabilities.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from .config import Recipe
from .dino.center import update_center
from .dino.ema import ema_update_
from .dino.loss import dino_loss
from .dino.multicrop import MultiCropConfig
from .dino.train import build_student_teacher, clip_per_tensor_, param_groups
from .vit import Attention, ViTConfig


class PILGaussianBlur:
    """Gaussian blur with probability ``p`` and a radius uniform in ``sigma`` (pixels), on a
    PIL image, as the DINO reference code does it (``ImageFilter.GaussianBlur``)."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class ReferenceMultiCrop:
    """``ReferenceMultiCrop(cfg, channels)(pil_image)`` -> ``n_global + n_local`` float32
    tensors ``(C, S, S)``: the global crops first, then the local ones.

    Per crop: random resized crop (bicubic) and flip, colour jitter with probability
    ``jitter_p`` and greyscale (3-channel data only), blur, solarisation (global views
    1, 2, ...), ``ToTensor`` and ``Normalize``. With ``local_from_global`` local crop j is
    cut from the geometry of global crop ``j mod n_global`` (the seed's variant).
    """

    def __init__(self, cfg: MultiCropConfig, channels: int):
        self.cfg = cfg
        bicubic = T.InterpolationMode.BICUBIC

        def geometry(size: int, scale: tuple[float, float]) -> T.Compose:
            return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=cfg.ratio,
                                                  interpolation=bicubic),
                              T.RandomHorizontalFlip(cfg.flip_p)])

        def finish(size: int, blur_p: float, solarize_p: float) -> T.Compose:
            colour = []
            if channels == 3:
                colour = [T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
                          T.RandomGrayscale(p=cfg.grey_p)]
            # Blur widths are given for a 224-px crop, as in the device multi-crop.
            sigma = (cfg.blur_sigma[0] * size / 224, cfg.blur_sigma[1] * size / 224)
            tail = [T.RandomSolarize(128, p=solarize_p)] if solarize_p > 0 else []
            return T.Compose([*colour, PILGaussianBlur(blur_p, sigma), *tail, T.ToTensor(),
                              T.Normalize(cfg.mean, cfg.std)])

        self.global_geometry = geometry(cfg.global_size, cfg.global_scale)
        self.local_geometry = geometry(cfg.local_size, cfg.local_scale)
        self.global_finish = [finish(cfg.global_size, cfg.blur_p[0] if i == 0 else cfg.blur_p[1],
                                     cfg.solarize_p if i >= 1 else 0.0)
                              for i in range(cfg.n_global)]
        self.local_finish = finish(cfg.local_size, cfg.blur_p[2], 0.0)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        cfg = self.cfg
        views = [self.global_geometry(img) for _ in range(cfg.n_global)]
        crops = [f(v) for f, v in zip(self.global_finish, views)]
        for j in range(cfg.n_local):
            parent = views[j % cfg.n_global] if cfg.local_from_global else img
            crops.append(self.local_finish(self.local_geometry(parent)))
        return crops


class ReferenceDataset(TorchDataset):
    """``uint8 (N, C, H, W)`` images served one PIL image at a time through ``transform``.

    ``length`` may exceed N (indices wrap), so a timed loop never crosses an epoch
    boundary where the workers would restart their prefetch.
    """

    def __init__(self, images: torch.Tensor, transform, length: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())  # NHWC
        self.transform = transform
        self.length = length or len(self.images)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        a = self.images[i % len(self.images)]
        img = Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
        return self.transform(img)


def make_loader(images: torch.Tensor, cfg: MultiCropConfig, batch_size: int, *, workers: int,
                pin_memory: bool = False, length: int | None = None, seed: int = 0
                ) -> DataLoader:
    """A shuffling, batch-dropping DataLoader yielding lists of ``n_global + n_local``
    batched crops ``(B, C, S, S)``."""
    ds = ReferenceDataset(images, ReferenceMultiCrop(cfg, images.shape[1]), length)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def to_model_input(batch: list[torch.Tensor], n_global: int, device: torch.device
                   ) -> list[torch.Tensor]:
    """Per-crop batches -> ``[global crops (n_global*B, ...), local crops (n_local*B, ...)]``,
    crop-major (crop 0 of every image, then crop 1, ...) as :func:`dino_loss` expects."""
    batch = [b.to(device, non_blocking=True) for b in batch]
    out = [torch.cat(batch[:n_global])]
    if len(batch) > n_global:
        out.append(torch.cat(batch[n_global:]))
    return out


class ExplicitAttention(Attention):
    """Attention that always takes the explicit path (materialised weights), whatever the
    caller asks: the attention of the DINO reference code."""

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        return super().forward(x, return_attention=True)


def use_explicit_attention_(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every :class:`Attention` in ``model`` to the explicit path, in place.
    Parameter names and values are unchanged (the class is swapped, not the module)."""
    for m in model.modules():
        if type(m) is Attention:
            m.__class__ = ExplicitAttention
    return model


class ReferenceTrainer:
    """The DINO step of the reference code on crops already on the device."""

    def __init__(self, recipe: Recipe, vit_cfg: ViTConfig, *, device: torch.device | str,
                 seed: int = 0):
        self.recipe = recipe.validate()
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.student, self.teacher = build_student_teacher(recipe, vit_cfg)
        for model in (self.student, self.teacher):
            use_explicit_attention_(model).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0)
        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cuda)
        self.center = torch.zeros(1, recipe.out_dim, device=self.device)

    def step(self, crops: list[torch.Tensor], lr: float, wd: float, momentum: float,
             teacher_temp: float, freeze_last_layer: bool = False) -> float:
        r = self.recipe
        with self.autocast:
            teacher_out = self.teacher(crops[:1])
            student_out = self.student(crops)
        loss = dino_loss(student_out, teacher_out, self.center, student_temp=r.student_temp,
                         teacher_temp=teacher_temp, n_global=r.n_global)
        value = loss.item()  # the reference code checks every step: a host sync
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_per_tensor_([p for g in self.optimizer.param_groups for p in g["params"]],
                         r.clip_grad)
        if freeze_last_layer:
            for p in self.student.head.last_layer_parameters():
                p.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update_(self.teacher, self.student, momentum)
        self.center = update_center(self.center, teacher_out, r.center_momentum)
        return value


def time_reference_pipeline(trainer, pool: torch.Tensor, crop: MultiCropConfig,
                            step_kw: dict, *, batch_size: int, workers: int, warmup: int,
                            steps: int, repeats: int, time_loader: bool = True,
                            seed: int = 0) -> dict:
    """Images/s of the reference pipeline on ``pool`` with ``trainer``'s recipe, ViT and
    device: end to end (``repeats`` x ``steps``), then one repeat each of its model step on
    fixed crops (no loader) and, with ``time_loader``, of its loader alone."""
    from .perf import Timer, mean_std, time_repeats

    device, B = trainer.device, batch_size
    timer = Timer(device)
    ref = ReferenceTrainer(trainer.recipe, trainer.vit_cfg, device=device, seed=seed)
    n_batches = warmup + steps * (repeats + 2) + 2 * workers + 4
    loader = make_loader(pool.cpu(), crop, B, workers=workers,
                         pin_memory=device.type == "cuda", length=B * n_batches, seed=seed)
    batches = iter(loader)
    fixed = to_model_input(next(batches), crop.n_global, device)

    def step():
        ref.step(to_model_input(next(batches), crop.n_global, device), **step_kw)

    for _ in range(max(1, warmup)):
        step()
    ips = [B / s for s in time_repeats(step, steps, repeats, timer)]
    mean, std = mean_std(ips)
    out = {"workers": workers, "attention": "explicit, eager",
           "autocast": "float16" if device.type == "cuda" else "off (float32)",
           "images_per_s": mean, "images_per_s_std": std, "images_per_s_repeats": ips}
    model_s = time_repeats(lambda: ref.step(fixed, **step_kw), steps, 1, timer)[0]
    out["model_step_images_per_s"] = B / model_s
    if time_loader:
        # Drain what the workers prefetched while the model ran, then time production.
        for _ in range(2 * workers + 1):
            next(batches)
        t0 = time.perf_counter()
        for _ in range(steps):
            to_model_input(next(batches), crop.n_global, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["loader_images_per_s"] = B * steps / (time.perf_counter() - t0)
    return out
