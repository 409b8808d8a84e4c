"""iBOT's masked-patch self-distillation (Zhou et al. 2022, arXiv:2111.07832), the
patch-level term DINOv2 (Oquab et al. 2023) adds to DINO's image-level one.

DINO's loss reads one token per view, the CLS. iBOT hides some patches of the student's
global views behind a learnt mask token and asks the student to predict, at each hidden
patch, the teacher's output for that patch of the whole view: a target per patch, where
DINO has one per image. As in iBOT with its shared head, patch tokens go through the same
head as the CLS token, and the teacher's patch outputs are centred by a running center of
their own, then sharpened by the same teacher temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import teacher_probs


def patch_masks(n_views: int, n_patches: int, ratio: tuple[float, float], p_view: float,
                gen: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Which patches each view hides: ``bool (n_views, n_patches)``.

    A view is masked with probability ``p_view``; a masked view hides
    ``max(1, round(r * n_patches))`` patches, ``r`` uniform in ``ratio``, chosen uniformly
    without replacement; the others hide none. Random patches, not iBOT's blocks: on a
    4 x 4 grid a block is most of the image."""
    lo, hi = ratio
    masked = torch.rand(n_views, generator=gen, device=device) < p_view
    r = lo + (hi - lo) * torch.rand(n_views, generator=gen, device=device)
    count = (r * n_patches).round().clamp(min=1) * masked
    # The rank of each patch in a random order: the first `count` ranks are hidden.
    rank = torch.rand(n_views, n_patches, generator=gen, device=device).argsort(1).argsort(1)
    return rank < count[:, None]


def ibot_loss(student_patch_logits: torch.Tensor, teacher_patch_logits: torch.Tensor,
              center: torch.Tensor, masks: torch.Tensor, *, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """``-sum_k q_k log p_k`` at each hidden patch, with ``q`` the teacher's centred,
    sharpened output for the patch (:func:`teacher_probs` with the patch center) and
    ``p = softmax(s / student_temp)`` the student's from the masked view; averaged over a
    view's hidden patches, then over all ``V`` views, a view that hides none counting 0
    (iBOT's mean over the batch; DINOv2's too). So the term's scale follows the share of
    views masked, and N processes under torchrun average to what one process computes.

    Logits ``(V, N, K)``, ``masks`` ``bool (V, N)``, ``center`` ``(1, K)``. Float32."""
    if student_patch_logits.shape != teacher_patch_logits.shape or (
            student_patch_logits.ndim != 3 or masks.shape != student_patch_logits.shape[:2]):
        raise ValueError(f"need student and teacher patch logits (V, N, K) of one shape and "
                         f"masks (V, N); got {tuple(student_patch_logits.shape)}, "
                         f"{tuple(teacher_patch_logits.shape)} and {tuple(masks.shape)}")
    k = teacher_patch_logits.shape[-1]
    q = teacher_probs(teacher_patch_logits.reshape(-1, k), center, teacher_temp)
    log_p = F.log_softmax(student_patch_logits.float().reshape(-1, k) / student_temp, dim=-1)
    ce = -(q * log_p).sum(-1).reshape(masks.shape)  # (V, N)
    m = masks.float()
    hidden = m.sum(1)
    return ((ce * m).sum(1) / hidden.clamp(min=1)).mean()
