"""The reference pipeline: the same DINO step, fed and run the way the DINO reference code
does it. ``dinobench bench --compare`` times it beside :class:`~dinobench.dino.train.DINOTrainer`
in the same process, on the same device.

What differs from dinobench (and only this):

- augmentation per image on PIL images with torchvision's v1 transforms, in DataLoader
  worker processes; the crops are collated on the host and copied to the device;
- attention through the explicit path (the ``(N x N)`` weights are materialised and
  soft-maxed), every module eager;
- fp16 autocast with a gradient scaler on CUDA (fp32 on CPU), a ``loss.item()`` check per
  step (one host synchronisation), AdamW with its default (non-fused) implementation;
- its own parameter groups and positional-embedding resize, written here from the DINO
  reference code rather than taken from dinobench: weight decay on every tensor but
  biases and 1-D ones (so on the CLS token and the positional embeddings too, which
  dinobench does not decay), and the resize by a scale factor with 0.1 added to the
  target grid (dinobench resizes to the target grid exactly). ``docs/reference.md`` gives
  the reasons; ``decay_embeddings=False, pos_embed="size"`` aligns both with dinobench,
  which the test of equal steps does.

What is shared: the ViT and head shapes and initialisation, :func:`dino_loss`,
:func:`update_center`, :func:`ema_update_` and per-tensor gradient clipping. Crop geometry
and colour follow the recipe with the same probabilities.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from .config import Recipe
from .dino.center import update_center
from .dino.clip import clip_per_tensor_
from .dino.ema import ema_update_
from .dino.loss import dino_loss
from .dino.model_setup import build_student_teacher
from .dino.multicrop import MultiCropConfig
from .vit import Attention, ViT, ViTConfig

POS_EMBED = ("official", "size")  # the resize formulas ReferenceTrainer knows


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


def worker_start_method() -> str | None:
    """``forkserver`` where the platform has it: workers start from a small server
    process, not as forks of this one, which by then may hold a CUDA context, the
    compiler's worker pool and their threads (a fork copies none of the threads, but
    inherits any lock one of them held)."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else None


def make_loader(images: torch.Tensor, cfg: MultiCropConfig, batch_size: int, *, workers: int,
                pin_memory: bool = False, length: int | None = None, seed: int = 0,
                prefetch_factor: int = 2) -> DataLoader:
    """A shuffling, batch-dropping DataLoader yielding lists of ``n_global + n_local``
    batched crops ``(B, C, S, S)``; ``prefetch_factor`` batches ahead per worker."""
    ds = ReferenceDataset(images, ReferenceMultiCrop(cfg, images.shape[1]), length)
    parallel = {}
    if workers > 0:
        parallel = {"prefetch_factor": prefetch_factor, "persistent_workers": True,
                    "multiprocessing_context": worker_start_method()}
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                      num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **parallel)


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


def reference_param_groups(model: torch.nn.Module, *, decay_embeddings: bool = True
                           ) -> list[dict]:
    """The DINO reference code's rule (``utils.get_params_groups``): no weight decay on
    biases and 1-D tensors, decay on everything else. ``decay_embeddings=False`` also
    spares the CLS token and the positional embeddings, as dinobench does."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        spared = name.endswith(".bias") or p.ndim == 1 or (
            not decay_embeddings and name.split(".")[-1] in ("cls_token", "pos_embed"))
        (no_decay if spared else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False,
                                               "weight_decay": 0.0}]


class ReferencePosEmbedViT(ViT):
    """A ViT whose positional-embedding resize is the reference code's, through
    ``F.interpolate`` (``pos_formula = "official"``), or bicubic to the exact target grid
    (``"size"``, the values dinobench computes as a matrix)."""

    pos_formula = "official"

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if self.pos_formula == "official":
            # DINO's interpolate_pos_encoding: a scale factor, with 0.1 added to the target
            # "to avoid floating point error in the interpolation" (the reference code
            # writes (w, h) for the (height, width) axes; crops are square there and here).
            grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / g, (grid_w + 0.1) / g),
                                 mode="bicubic")
        else:
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic",
                                 align_corners=False)
        if tuple(grid.shape[-2:]) != (grid_h, grid_w):
            raise ValueError(f"resized grid {tuple(grid.shape[-2:])}, wanted "
                             f"{(grid_h, grid_w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)


def use_reference_pos_embed_(model: torch.nn.Module, formula: str = "official"
                             ) -> torch.nn.Module:
    """Give every :class:`ViT` in ``model`` the reference resize, in place (the class is
    swapped; parameters are unchanged)."""
    if formula not in POS_EMBED:
        raise ValueError(f"pos_embed must be one of {POS_EMBED}, got {formula!r}")
    for m in model.modules():
        if isinstance(m, ViT):
            m.__class__ = ReferencePosEmbedViT
            m.pos_formula = formula
    return model


class ReferenceTrainer:
    """The DINO step of the reference code on crops already on the device.

    ``pos_embed`` and ``decay_embeddings`` choose the reference code's positional-
    embedding resize and weight-decay rule (the defaults) or dinobench's."""

    def __init__(self, recipe: Recipe, vit_cfg: ViTConfig, *, device: torch.device | str,
                 seed: int = 0, pos_embed: str = "official", decay_embeddings: bool = True):
        self.recipe = recipe.validate()
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.student, self.teacher = build_student_teacher(recipe, vit_cfg)
        for model in (self.student, self.teacher):
            use_reference_pos_embed_(use_explicit_attention_(model), pos_embed).to(self.device)
        self.optimizer = torch.optim.AdamW(
            reference_param_groups(self.student, decay_embeddings=decay_embeddings), lr=0.0)
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
                            seed: int = 0, prefetch_factor: int = 2) -> dict:
    """Images/s of the reference pipeline on ``pool`` with ``trainer``'s recipe, ViT and
    device: end to end (``repeats`` x ``steps``), then one repeat each of its model step on
    fixed crops (no loader) and, with ``time_loader``, of its loader alone."""
    from .perf import Timer, mean_std, time_repeats

    device, B = trainer.device, batch_size
    timer = Timer(device)
    ref = ReferenceTrainer(trainer.recipe, trainer.vit_cfg, device=device, seed=seed)
    ahead = prefetch_factor * workers  # batches the workers hold ready
    n_batches = warmup + steps * (repeats + 2) + ahead + 4
    loader = make_loader(pool.cpu(), crop, B, workers=workers,
                         pin_memory=device.type == "cuda", length=B * n_batches, seed=seed,
                         prefetch_factor=prefetch_factor)
    batches = iter(loader)
    fixed = to_model_input(next(batches), crop.n_global, device)

    def step():
        ref.step(to_model_input(next(batches), crop.n_global, device), **step_kw)

    for _ in range(max(1, warmup)):
        step()
    ips = [B / s for s in time_repeats(step, steps, repeats, timer)]
    mean, std = mean_std(ips)
    out = {"workers": workers, "prefetch_factor": prefetch_factor,
           "start_method": (worker_start_method() or "default") if workers else "none",
           "attention": "explicit, eager",
           "autocast": "float16" if device.type == "cuda" else "off (float32)",
           "images_per_s": mean, "images_per_s_std": std, "images_per_s_repeats": ips}
    model_s = time_repeats(lambda: ref.step(fixed, **step_kw), steps, 1, timer)[0]
    out["model_step_images_per_s"] = B / model_s
    if time_loader:
        # Drain what the workers prefetched while the model ran, then time production.
        for _ in range(ahead + 1):
            next(batches)
        t0 = time.perf_counter()
        for _ in range(steps):
            to_model_input(next(batches), crop.n_global, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out["loader_images_per_s"] = B * steps / (time.perf_counter() - t0)
    return out
