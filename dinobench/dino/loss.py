"""The DINO objective (Caron et al. 2021, arXiv:2104.14294, Eq. 3 and Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor,
                  teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)`` in float32,
    detached: the teacher is updated by EMA only, never by the loss gradient."""
    t = teacher_logits.detach().float() - center.detach().float().reshape(1, -1)
    return F.softmax(t / teacher_temp, dim=-1)


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              *, student_temp: float, teacher_temp: float, n_global: int = 2) -> torch.Tensor:
    """Cross-entropy from every teacher view to every other student view.

    Args:
        student_logits: ``(n_crops * B, K)``, crop-major (crop 0 of every image, then
            crop 1, ...); the first ``n_global`` crops are the global views.
        teacher_logits: ``(n_global * B, K)`` in the same order. Carries no gradient.
        center: ``(K,)`` or ``(1, K)``, subtracted from the teacher logits.
        student_temp, teacher_temp: the sharpening temperatures tau_s and tau_t.
        n_global: how many views the teacher saw.

    Returns the mean over all pairs (teacher view i, student view v != i) of the batch mean
    of ``sum_k -P_t(i)_k log P_s(v)_k``. Computed in float32 whatever the input dtype.
    """
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be positive, got student_temp={student_temp}, "
                         f"teacher_temp={teacher_temp}")
    _check_views(student_logits, teacher_logits, n_global)
    if center.numel() != teacher_logits.shape[1]:
        raise ValueError(f"K differs: student {student_logits.shape[1]}, teacher "
                         f"{teacher_logits.shape[1]}, center {center.numel()}")
    q = teacher_probs(teacher_logits, center, teacher_temp)
    return _cross_entropy_over_pairs(student_logits, q, student_temp, n_global)


def dino_loss_from_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor, *,
                         student_temp: float, n_global: int = 2) -> torch.Tensor:
    """:func:`dino_loss` with the teacher targets given as probabilities, for targets made
    some other way than ``softmax((t - c) / tau_t)`` (Sinkhorn-Knopp centering).

    ``teacher_probs`` is ``(n_global * B, K)``, crop-major like ``dino_loss``'s teacher
    logits, rows summing to 1; it is detached. Same pairs, same mean, float32.
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be positive, got {student_temp}")
    _check_views(student_logits, teacher_probs, n_global)
    return _cross_entropy_over_pairs(student_logits, teacher_probs.detach().float(),
                                     student_temp, n_global)


def _check_views(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 n_global: int) -> None:
    """Shapes of the student's and the teacher's rows (the teacher's logits or
    probabilities): the same K, and views that form at least one pair."""
    if n_global < 1:
        raise ValueError(f"n_global must be at least 1, got {n_global}")
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ValueError("student_logits and teacher_logits must be 2-D (rows, K), got shapes "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    K = teacher_logits.shape[1]
    if K < 2:
        raise ValueError(f"K = {K}: DINO needs at least 2 outputs (a softmax over one output "
                         "is constant)")
    if student_logits.shape[1] != K:
        raise ValueError(f"K differs: student {student_logits.shape[1]}, teacher {K}")
    if teacher_logits.shape[0] % n_global:
        raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows, not a multiple "
                         f"of n_global={n_global}")
    B = teacher_logits.shape[0] // n_global
    if B == 0 or student_logits.shape[0] % B:
        raise ValueError(f"student_logits has {student_logits.shape[0]} rows, not a multiple "
                         f"of the batch size {B} implied by the teacher")
    n_crops = student_logits.shape[0] // B
    if n_crops < n_global or n_crops * n_global - n_global < 1:
        raise ValueError(f"{n_crops} student crops and {n_global} teacher views leave no "
                         "pair (i, v) with v != i")


def _cross_entropy_over_pairs(student_logits: torch.Tensor, q: torch.Tensor,
                              student_temp: float, n_global: int) -> torch.Tensor:
    K = q.shape[1]
    B = q.shape[0] // n_global
    n_crops = student_logits.shape[0] // B
    q = q.view(n_global, B, K)
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1).view(n_crops, B, K)
    # cross[i, v] = batch mean of the cross-entropy from teacher view i to student view v.
    cross = -torch.einsum("ibk,vbk->iv", q, log_p) / B
    same_view = cross.diagonal()[:n_global].sum()  # pairs (i, i): excluded
    n_pairs = n_global * n_crops - n_global
    return (cross.sum() - same_view) / n_pairs


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the rows of ``probs``."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
