"""The networks DINO trains and how its optimizer sees them: a student and a teacher of
the same architecture from the same initialisation, and the student's parameters split
into the groups that weight decay does or does not touch.

The trainer and the reference pipeline build their networks here, and the supervised
baseline takes its weight-decay groups from here, so they agree on both."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from ..config import Recipe
from ..vit import ViT, ViTConfig
from .heads import DINOModel, build_head


def build_student_teacher(recipe: Recipe, vit_cfg: ViTConfig) -> tuple[DINOModel, DINOModel]:
    """Student and teacher from the same initialisation. Only the student uses
    stochastic depth; the teacher is never trained by gradient. The backbone has a mask
    token exactly when the recipe trains iBOT's masked-patch loss."""
    vit_cfg = dataclasses.replace(vit_cfg, mask_token=recipe.ibot_weight > 0)
    student = DINOModel(
        ViT(dataclasses.replace(vit_cfg, drop_path=recipe.drop_path)),
        build_head(recipe.head, vit_cfg.dim, recipe.out_dim, recipe.head_hidden_dim,
                   recipe.head_bottleneck_dim, recipe.head_bn, recipe.norm_last_layer),
    )
    teacher = copy.deepcopy(student)
    for block in teacher.backbone.blocks:
        block.drop_path.p = 0.0
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, the CLS token or the
    positional embeddings. The DINO reference code decays the last two as well (it skips
    only 1-D tensors); here they, and iBOT's mask token, count as vectors of the token
    space, not as maps. The head's learnt last-layer weight norm g ``(K, 1)``
    (``--no-norm-last-layer``) is decayed, as the reference code decays its
    ``weight_g``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed",
                                                          "mask_token"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False,
                                               "weight_decay": 0.0}]
