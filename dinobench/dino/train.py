"""The DINO training loop: student and EMA teacher, centering, sharpening, schedules.

One code path for CPU and GPU, one process or many (``torchrun``). Per step, everything
stays on the device: batch indexing, multi-crop, forward/backward, optimizer, EMA,
centering, the running sums that feed the log (loss and the collapse diagnostics of
``diagnostics.py``) and the non-finite-loss watch (both in ``epoch_stats.py``). The host
reads them once per epoch (one synchronisation), so the GPU never waits on Python inside
an epoch. The networks and the optimizer's groups are built in ``model_setup.py``.

The trainer's whole state (weights, optimizer, center, position in the epoch, every
random generator) is one ``state_dict``: a run saved at any step and resumed continues
exactly as if it had not stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PRECISIONS, Recipe
from ..data.device import DeviceImages
from ..distributed import SINGLE, DistInfo, any_rank, gather_objects
from ..errors import ConfigError
from ..io import atomic_write_text
from ..vit import ViTConfig
from .align import alignment_loss
from .center import update_center
from .clip import clip_per_tensor_
from .ema import ema_update_
from .epoch_stats import EpochStats, epoch_line, step_diagnostics
from .faults import collapse_reason
from .heads import DINOModel
from .ibot import ibot_loss, patch_masks
from .koleo import koleo_loss
from .loss import dino_loss, dino_loss_from_probs, teacher_probs
from .model_setup import build_student_teacher, param_groups
from .multicrop import MultiCrop, MultiCropConfig
from .schedules import cosine_schedule, teacher_temp_schedule
from .sinkhorn import sinkhorn_knopp


class Interrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after saving a checkpoint."""


@dataclass
class TrainResult:
    student: DINOModel
    teacher: DINOModel
    center: torch.Tensor
    history: list[dict] = field(default_factory=list)  # one record per epoch
    seconds: float = 0.0
    collapsed: str | None = None  # why the run looks collapsed, or None
    budget_stop: bool = False  # the time budget (max_seconds) ended training early


def resolved_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``--precision`` means on ``device``. ``auto`` is bf16 on
    CUDA and float32 on a CPU, where bf16 pays only on cores with native bf16 instructions
    (AVX512-BF16, AMX), so it must be asked for."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def step_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The autocast of the training step's forward passes. The loss (computed in float32
    from the logits), the center and the teacher's EMA stay float32 either way."""
    bf16 = resolved_precision(precision, device) == "bf16"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


class DINOTrainer:
    """Trains DINO on a ``uint8`` image tensor; ``fit`` returns the student and teacher.

    With a process group (``dist.world_size > 1``) each rank takes its slice of every
    global batch of ``recipe.batch_size`` images, gradients are averaged by DDP and the
    center by all-reduce, so every rank holds the same student, teacher and center. The
    batch-mean target (for the marginal entropy) and Sinkhorn-Knopp's per-output sums are
    all-reduced too, so they describe the global batch whatever the number of processes.
    """

    def __init__(self, recipe: Recipe, vit_cfg: ViTConfig, crop_cfg: MultiCropConfig, *,
                 device: torch.device | str = "cpu", seed: int = 0, compile: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print,
                 log_path: str | Path | None = None,
                 on_epoch_end: Callable[[int, DINOModel], dict | None] | None = None,
                 dist: DistInfo = SINGLE, precision: str = "auto"):
        self.recipe = recipe.validate()
        self.vit_cfg = vit_cfg
        self.crop_cfg = crop_cfg
        self.device = torch.device(device)
        self.seed = seed
        self.progress = progress and dist.is_main
        self.log = log
        self.log_path = Path(log_path) if log_path and dist.is_main else None
        self.on_epoch_end = on_epoch_end
        self.dist = dist
        if recipe.batch_size % dist.world_size:
            raise ConfigError(f"--batch-size {recipe.batch_size} must be a multiple of the "
                              f"{dist.world_size} processes")
        self.local_batch = recipe.batch_size // dist.world_size
        if self.local_batch < 2:
            raise ConfigError(f"a batch of {self.local_batch} image(s) per process is too "
                              "small for centering (it needs a mean over several images); "
                              "use --batch-size 2 or more per process")
        torch.manual_seed(seed)
        self.student, self.teacher = build_student_teacher(recipe, vit_cfg)
        if dist.enabled:  # same initial weights everywhere, own drop-path masks per rank
            torch.manual_seed(seed * 7919 + 3 + dist.rank)
        self.student.to(self.device)
        self.teacher.to(self.device)
        self.multicrop = MultiCrop(crop_cfg)
        self.center = torch.zeros(1, recipe.out_dim, device=self.device)
        # iBOT's patch targets are centred apart from the CLS targets: a patch token's
        # mean output is not an image's.
        self.patch_center = (torch.zeros(1, recipe.out_dim, device=self.device)
                             if recipe.ibot_weight else None)
        cuda = self.device.type == "cuda"
        # Fused AdamW: a few kernels per step on CUDA, and on a CPU too (torch >= 2.4),
        # where it is several times faster than the default implementation.
        try:
            self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0, fused=True)
        except RuntimeError:  # no fused kernel for this device in this torch
            self.optimizer = torch.optim.AdamW(param_groups(self.student), lr=0.0)
        self.autocast = step_autocast(self.device, precision)
        student_fwd = self.student
        if dist.enabled:
            student_fwd = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if cuda else None)
        self.student_fwd, self.teacher_fwd = student_fwd, self.teacher
        self._eager_fwd = (student_fwd, self.teacher)
        # torch.compile compiles lazily, at the first forward and backward: until a step
        # has passed, a compiler failure falls back to eager instead of ending the run.
        self._compile_unproven = compile
        if compile:
            self.student_fwd = torch.compile(student_fwd, dynamic=False)
            self.teacher_fwd = torch.compile(self.teacher, dynamic=False)
        # Random streams: augmentation differs per rank; the batch order is shared.
        self.aug_gen = torch.Generator(self.device).manual_seed(seed * 7919 + 1 + dist.rank)
        self.order_gen = torch.Generator().manual_seed(seed * 7919 + 2)
        # Position: epochs done, optimizer steps done, steps done in the current epoch.
        self.epoch, self.step_count, self.pos = 0, 0, 0
        self.order: torch.Tensor | None = None  # this epoch's permutation of the images
        # This epoch's running sums and the non-finite-loss watch, on the device.
        self.stats = EpochStats(recipe.out_dim, self.device, dist)
        self.history: list[dict] = []
        # Wall-clock seconds spent training (evaluation and checkpoints excluded), summed
        # over every fit() of this state: a resumed run continues the count.
        self.train_seconds = 0.0

    # --- schedules -------------------------------------------------------------------
    def steps_per_epoch(self, n_images: int) -> int:
        return n_images // self.recipe.batch_size  # the last partial batch is dropped

    def schedules(self, steps_per_epoch: int) -> dict:
        r = self.recipe
        total = r.epochs * steps_per_epoch
        peak_lr = r.lr * r.batch_size / 256  # linear scaling rule
        warmup = min(r.warmup_epochs * steps_per_epoch, total)
        return {
            "lr": cosine_schedule(peak_lr, r.min_lr, total, warmup),
            "wd": cosine_schedule(r.weight_decay, r.weight_decay_end, total),
            "momentum": cosine_schedule(r.teacher_momentum, 1.0, total),
            "koleo": cosine_schedule(r.koleo_weight, r.koleo_weight if r.koleo_weight_end
                                     is None else r.koleo_weight_end, total),
            "teacher_temp": teacher_temp_schedule(r.warmup_teacher_temp, r.teacher_temp,
                                                  r.warmup_teacher_temp_epochs, r.epochs),
        }

    # --- one step --------------------------------------------------------------------
    def step(self, batch: torch.Tensor, gen: torch.Generator, lr: float, wd: float,
             momentum: float, teacher_temp: float, freeze_last_layer: bool,
             koleo_weight: float | None = None) -> dict:
        """One DINO step on a ``uint8`` batch, with the KoLeo weight of this step
        (default: the recipe's; a recipe without KoLeo has none, whatever is given).
        Returns device tensors (no sync)."""
        r = self.recipe
        crops = self.multicrop(batch, gen)
        masks = (patch_masks(crops[0].shape[0], self.vit_cfg.grid**2, r.ibot_mask_ratio,
                             r.ibot_mask_p, gen, self.device) if r.ibot_weight else None)
        try:
            teacher_out, targets, loss, teacher_patches = self._forward_backward(
                crops, teacher_temp, masks, koleo_weight)
        except Exception as e:  # noqa: BLE001 - any compiler error, whatever its type
            if not self._compile_unproven:
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"torch.compile failed ({type(e).__name__}: {first}); continuing "
                     "in eager mode")
            self.student_fwd, self.teacher_fwd = self._eager_fwd
            teacher_out, targets, loss, teacher_patches = self._forward_backward(
                crops, teacher_temp, masks, koleo_weight)
        self._compile_unproven = False
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["decay"]:
                group["weight_decay"] = wd
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip_per_tensor_(params, r.clip_grad)
        if freeze_last_layer:
            for p in self.student.head.last_layer_parameters():
                p.grad = None
        self.optimizer.step()
        ema_update_(self.teacher, self.student, momentum)
        diagnostics = step_diagnostics(targets)
        # Sinkhorn-Knopp does not read the center (a per-output shift of the teacher logits
        # leaves its targets unchanged), but keeping it costs one mean and keeps the state
        # and the logged center the same in both modes.
        self.center = update_center(self.center, teacher_out, r.center_momentum)
        if teacher_patches is not None:
            self.patch_center = update_center(self.patch_center, teacher_patches.flatten(0, 1),
                                              r.center_momentum)
        return {"loss": loss.detach(), **diagnostics}

    def _forward_backward(self, crops: list[torch.Tensor], teacher_temp: float,
                          masks: torch.Tensor | None = None,
                          koleo_weight: float | None = None):
        """Teacher and student forward, the loss, fresh student gradients. Returns the
        teacher logits, the targets the loss used (probabilities), the DINO loss and,
        with iBOT's ``masks`` (hidden patches of the global views), the teacher's patch
        logits (else None)."""
        r = self.recipe
        koleo_weight = r.koleo_weight if koleo_weight is None else koleo_weight
        teacher_patches = None
        with self.autocast:
            if masks is not None:  # the teacher sees every patch, the student the masked views
                teacher_out, teacher_features, teacher_patches = self.teacher_fwd(
                    crops[:1], patches=True)
                student_out, features, student_patches = self.student_fwd(
                    crops, return_features=True, patches=True, masks=masks)
            else:  # the teacher sees the global views only
                if r.align_weight:
                    teacher_out, teacher_features = self.teacher_fwd(crops[:1],
                                                                     return_features=True)
                else:
                    teacher_out = self.teacher_fwd(crops[:1])
                if r.koleo_weight or r.align_weight:
                    student_out, features = self.student_fwd(crops, return_features=True)
                else:
                    student_out = self.student_fwd(crops)
        if r.centering == "sinkhorn":  # all global views balanced together, as DINOv2
            targets = sinkhorn_knopp(teacher_out, teacher_temp, r.sinkhorn_iterations)
            loss = dino_loss_from_probs(student_out, targets, student_temp=r.student_temp,
                                        n_global=r.n_global)
        else:
            loss = dino_loss(student_out, teacher_out, self.center,
                             student_temp=r.student_temp, teacher_temp=teacher_temp,
                             n_global=r.n_global)
            targets = teacher_probs(teacher_out, self.center, teacher_temp)
        # dino_weight 1 (every preset) leaves the loss as it is: 1.0 * x is exact.
        objective = r.dino_weight * loss
        if r.koleo_weight:  # per global view, as DINOv2: two views of one image are close
            # by design, so each view's neighbours are other images. The logged loss stays
            # DINO's, comparable across recipes. (A schedule that ends at 0 still computes
            # the features: the forward stays one shape for the whole run.)
            views = features[:crops[0].shape[0]].chunk(r.n_global)
            objective = objective + koleo_weight * sum(koleo_loss(v) for v in views)
        if r.align_weight:
            objective = objective + r.align_weight * alignment_loss(
                features, teacher_features, r.n_global)
        if masks is not None:
            objective = objective + r.ibot_weight * ibot_loss(
                student_patches, teacher_patches, self.patch_center, masks,
                student_temp=r.student_temp, teacher_temp=teacher_temp)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        return teacher_out, targets, loss, teacher_patches

    # --- the loop --------------------------------------------------------------------
    def fit(self, images: torch.Tensor, *,
            checkpoint: Callable[[DINOTrainer], None] | None = None,
            checkpoint_every: int = 0,
            should_stop: Callable[[], bool] | None = None,
            max_seconds: float | None = None) -> TrainResult:
        """Train until ``recipe.epochs`` (continuing from a loaded state, if any).

        ``checkpoint(self)`` is called every ``checkpoint_every`` epochs, and when
        ``should_stop()`` turns true at a step boundary (then :class:`Interrupted` is
        raised). A non-finite loss raises :class:`NonFiniteLoss` at the end of its epoch,
        before any checkpoint could save the broken weights.

        Each epoch record gets ``train_seconds`` (training time so far, without the
        evaluations and checkpoints), ``eval_seconds`` (this epoch's ``on_epoch_end``)
        and ``images_seen`` (steps x batch size so far). With ``max_seconds``, training
        ends at the first step boundary after ``train_seconds`` passes it, as if it were
        the last epoch: a record for the steps done (``on_epoch_end`` called with
        ``final=True`` so it evaluates there, and ``budget_stop: True``), a checkpoint,
        ``budget_stop`` in the result. The schedules stay planned on ``recipe.epochs``:
        a budget truncates them. The position inside the epoch is kept, so a larger
        budget on the saved state continues exactly; the same budget returns at once.
        """
        r = self.recipe
        n = images.shape[0]
        if n < r.batch_size:
            raise ConfigError(f"--batch-size {r.batch_size} exceeds the {n} training images; "
                              "lower --batch-size")
        source = DeviceImages(images, self.device)  # resident on the GPU when it fits
        steps = self.steps_per_epoch(n)
        sched = self.schedules(steps)
        lo = self.dist.rank * self.local_batch  # this rank's slice of each global batch
        if self.log_path:  # a resumed run's log restarts from its checkpoint
            atomic_write_text(self.log_path, "".join(json.dumps(h) + "\n"
                                                     for h in self.history))
        t_start = time.perf_counter()
        # The budget check reads the host clock without synchronising (on CUDA the host
        # runs a few steps ahead, so the cut can come that much late); train_seconds
        # itself is taken after the epoch's synchronisation.
        def over_budget(running: float) -> bool:
            return max_seconds is not None and any_rank(
                self.train_seconds + running > max_seconds)

        # A state that this budget already ended (its last record is the cut, at the
        # current step): nothing is left to do.
        cut = (bool(self.history) and self.history[-1].get("budget_stop", False)
               and self.history[-1]["step"] == self.step_count and over_budget(0.0))
        while self.epoch < r.epochs and not cut:
            epoch = self.epoch
            self.student.train()
            if self.order is None:  # a new epoch (a resumed one keeps its order)
                self.order = torch.randperm(n, generator=self.order_gen)
                self.pos = 0
                self.stats.reset()
            t_epoch, first = time.perf_counter(), self.pos
            # This rank's images for the epoch's remaining steps: its slice of each
            # global batch, (steps, batch_size) -> (steps - pos) * local_batch.
            mine = self.order[:steps * r.batch_size].view(steps, r.batch_size)
            mine = mine[self.pos:, lo:lo + self.local_batch].reshape(-1)
            batches = source.epoch_batches(mine, self.local_batch)
            bar = tqdm(zip(range(self.pos, steps), batches), total=steps, initial=self.pos,
                       desc=f"epoch {epoch + 1}/{r.epochs}", leave=False,
                       dynamic_ncols=True,
                       # None lets tqdm hide itself when stderr is not a terminal.
                       disable=None if self.progress else True)
            for i, batch in bar:
                # Every rank must stop at the same step, or one would wait forever in
                # the gradient all-reduce of the others.
                if should_stop is not None and any_rank(should_stop()):
                    self.stats.check_finite()
                    self.train_seconds += time.perf_counter() - t_epoch
                    if checkpoint is not None:
                        checkpoint(self)
                    raise Interrupted(f"stopped at epoch {epoch + 1}, step {self.step_count}")
                s = self.step_count
                out = self.step(batch, self.aug_gen, float(sched["lr"][s]),
                                float(sched["wd"][s]), float(sched["momentum"][s]),
                                float(sched["teacher_temp"][epoch]),
                                epoch < r.freeze_last_layer_epochs,
                                koleo_weight=float(sched["koleo"][s]))
                self.stats.add(out)
                self.step_count += 1
                self.pos = i + 1
                if (self.pos < steps or epoch + 1 < r.epochs) and over_budget(
                        time.perf_counter() - t_epoch):
                    cut = True
                    break
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stats.check_finite()
            seconds = time.perf_counter() - t_epoch
            # Means over the steps done this epoch: all of them, unless the budget cut it.
            record = self._epoch_record(self.pos, self.pos - first, sched, seconds)
            self.train_seconds += seconds
            t_eval = time.perf_counter()
            if self.on_epoch_end is not None:
                record.update((self.on_epoch_end(epoch, self.teacher, final=True) if cut
                               else self.on_epoch_end(epoch, self.teacher)) or {})
            record.update(train_seconds=self.train_seconds,
                          eval_seconds=time.perf_counter() - t_eval,
                          images_seen=self.step_count * r.batch_size)
            if cut:  # and the budget that cut it, for the log's reader
                record.update(budget_stop=True, budget_seconds=max_seconds)
            self.history.append(record)
            if self.pos == steps:  # a cut inside an epoch keeps its place in it
                self.epoch, self.order = epoch + 1, None
            last = cut or self.epoch == r.epochs
            if checkpoint is not None and (last or (
                    checkpoint_every and self.epoch % checkpoint_every == 0)):
                checkpoint(self)
            # After the checkpoint: an epoch that checkpoints is logged once it is saved.
            self._log_epoch(record)
        return TrainResult(self.student, self.teacher, self.center, self.history,
                           time.perf_counter() - t_start, collapse_reason(self.history),
                           budget_stop=cut)

    def _epoch_record(self, steps: int, timed_steps: int, sched: dict,
                      seconds: float) -> dict:
        """The epoch's log record: where training stands, the means of its running sums,
        the schedules' values at its last step and its speed (in this key order, which
        the JSONL log keeps)."""
        s = self.step_count - 1
        return {
            "epoch": self.epoch + 1,
            "step": self.step_count,
            **self.stats.means(steps),
            "lr": float(sched["lr"][s]),
            "weight_decay": float(sched["wd"][s]),
            "teacher_momentum": float(sched["momentum"][s]),
            "teacher_temp": float(sched["teacher_temp"][self.epoch]),
            **({"koleo_weight": float(sched["koleo"][s])}
               if self.recipe.koleo_weight_end is not None else {}),
            "images_per_s": timed_steps * self.recipe.batch_size / max(seconds, 1e-9),
            "seconds": seconds,
        }

    def _log_epoch(self, rec: dict) -> None:
        if not self.dist.is_main:
            return
        if self.log_path:
            with self.log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        self.log(epoch_line(rec, self.recipe.epochs, self.recipe.out_dim))

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole state. Under torchrun every rank must call it (the per-rank random
        streams and running sums are gathered); rank 0 then writes it."""
        mine = {"aug": self.aug_gen.get_state(), "torch": torch.get_rng_state(),
                **self.stats.state_dict()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(), "center": self.center.cpu(),
            "epoch": self.epoch, "step": self.step_count, "pos": self.pos,
            "order": self.order, "order_rng": self.order_gen.get_state(),
            "history": self.history, "ranks": gather_objects(mine),
            "train_seconds": self.train_seconds,
            **({"patch_center": self.patch_center.cpu()}
               if self.patch_center is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if len(ranks) != self.dist.world_size:
            raise ValueError(f"the checkpoint holds {len(ranks)} processes' state, this run "
                             f"has {self.dist.world_size}")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.center = state["center"].to(self.device)
        if self.patch_center is not None:
            self.patch_center = state["patch_center"].to(self.device)
        self.epoch, self.step_count, self.pos = state["epoch"], state["step"], state["pos"]
        self.order = state["order"]
        self.order_gen.set_state(state["order_rng"])
        self.history = list(state["history"])
        # A checkpoint without the count (older format) continues from its last record.
        self.train_seconds = state.get("train_seconds", self.history[-1].get(
            "train_seconds", 0.0) if self.history else 0.0)
        mine = ranks[self.dist.rank]
        self.stats.load_state_dict(mine, self.step_count)
        torch.set_rng_state(mine["torch"])
        self.aug_gen.set_state(mine["aug"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)
