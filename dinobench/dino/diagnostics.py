"""Collapse diagnostics on the teacher's targets and the student's logits.

DINO's healthy teacher is sharp for each image (low per-image entropy) yet spreads the
images of a batch over many outputs (high entropy of the batch-mean distribution). The two
trivial solutions (Caron et al. 2021, Sec. 5.3) differ from it in one of these numbers:

- collapse to one output: every image gets the same one-hot target, so the batch-mean
  distribution is one-hot too (marginal entropy near 0), although per image the teacher
  looks exactly as sharp as a healthy one;
- collapse to uniform: every target is uniform (per-image entropy near log K).

In both the student has nothing left to learn: KL(teacher || student) goes to 0. A healthy
run keeps that KL above 0, because the teacher's targets change from view to view.

All functions take probabilities (rows sum to 1) or logits with rows as images and columns
as the K outputs, work in float32 at least (float64 stays float64), and never synchronise
with the host, so the trainer can sum them on the device every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rows(probs: torch.Tensor) -> torch.Tensor:
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities shaped (rows, K) with at least one row, "
                         f"got shape {tuple(probs.shape)}")
    return probs.detach() if probs.dtype == torch.float64 else probs.detach().float()


def distribution_entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last dimension; ``0 log 0`` counts as 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def teacher_entropy(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's target entropy: near 0 for a sharp teacher (healthy
    or collapsed to one output), near log K for a uniform one."""
    return distribution_entropy(_rows(teacher_probs)).mean()


def batch_mean(teacher_probs: torch.Tensor) -> torch.Tensor:
    """The batch-mean target distribution (the marginal over outputs), shape ``(K,)``."""
    return _rows(teacher_probs).mean(0)


def marginal_entropy(teacher_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean target distribution: near 0 when every image picks the same
    output, up to log K when the images spread evenly over all outputs."""
    return distribution_entropy(batch_mean(teacher_probs))


def kl_divergence(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                  student_temp: float) -> torch.Tensor:
    """Mean over rows of KL(teacher || softmax(student_logits / student_temp)), row i of
    the teacher paired with row i of the student."""
    q = _rows(teacher_probs)
    if student_logits.shape != q.shape:
        raise ValueError(f"teacher_probs {tuple(q.shape)} and student_logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    log_p = F.log_softmax(student_logits.detach().to(q.dtype) / student_temp, dim=-1)
    return (torch.special.xlogy(q, q) - q * log_p).sum(-1).mean()


def pairwise_kl(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                student_temp: float, n_global: int = 2) -> torch.Tensor:
    """KL(teacher || student) averaged as the DINO loss averages its cross-entropies: over
    every pair (teacher view i, student view v != i), crop-major rows as in ``dino_loss``.

    Every teacher view enters the same number of pairs, so this equals the DINO loss minus
    the mean target entropy; the trainer logs it that way, at no extra cost.
    """
    q = _rows(teacher_probs)
    B, K = q.shape[0] // n_global, q.shape[1]
    if B == 0 or q.shape[0] % n_global or student_logits.shape[0] % B:
        raise ValueError(f"{q.shape[0]} teacher rows and {student_logits.shape[0]} student "
                         f"rows do not split into {n_global} teacher views of one batch")
    n_crops = student_logits.shape[0] // B
    q = q.view(n_global, B, K)
    s = student_logits.detach().to(q.dtype).view(n_crops, B, K)
    total, pairs = q.new_zeros(()), 0
    for i in range(n_global):
        for v in range(n_crops):
            if v != i:
                total = total + kl_divergence(q[i], s[v], student_temp)
                pairs += 1
    return total / pairs


def argmax_counts(teacher_probs: torch.Tensor) -> torch.Tensor:
    """How many rows have each output as their argmax, shape ``(K,)``, int64.

    ``scatter_add_`` rather than ``torch.bincount``: on CUDA bincount reads the largest
    index back to the host to size its output, a synchronisation per call.
    """
    q = _rows(teacher_probs)
    idx = q.argmax(-1)
    counts = torch.zeros(q.shape[1], dtype=torch.long, device=q.device)
    return counts.scatter_add_(0, idx, torch.ones_like(idx))


def outputs_used(teacher_probs: torch.Tensor) -> int:
    """The number of outputs that are the argmax of at least one row (reads the host)."""
    return int(argmax_counts(teacher_probs).count_nonzero())


__all__ = ["argmax_counts", "batch_mean", "distribution_entropy", "kl_divergence",
           "marginal_entropy", "outputs_used", "pairwise_kl", "teacher_entropy"]
