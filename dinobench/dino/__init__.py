"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294)."""

from .center import update_center
from .ema import ema_update_
from .heads import DINOHead, DINOModel, SeedHead, build_head
from .loss import dino_loss, dino_loss_from_probs, entropy, teacher_probs
from .schedules import cosine_schedule, teacher_temp_schedule
from .sinkhorn import sinkhorn_knopp

__all__ = ["DINOHead", "DINOModel", "SeedHead", "build_head", "cosine_schedule",
           "dino_loss", "dino_loss_from_probs", "ema_update_", "entropy", "sinkhorn_knopp",
           "teacher_probs", "teacher_temp_schedule", "update_center"]
