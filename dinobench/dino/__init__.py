"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294)."""

from .center import update_center
from .ema import ema_update_
from .heads import DINOHead, DINOModel, SeedHead, build_head
from .loss import dino_loss, entropy, teacher_probs
from .schedules import cosine_schedule, teacher_temp_schedule

__all__ = ["DINOHead", "DINOModel", "SeedHead", "build_head", "cosine_schedule",
           "dino_loss", "ema_update_", "entropy", "teacher_probs", "teacher_temp_schedule",
           "update_center"]
