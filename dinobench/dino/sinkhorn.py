"""Sinkhorn-Knopp centering of the teacher (SwAV, Caron et al. 2020; DINOv2, Oquab et al.
2023), an alternative to momentum centering (``--centering sinkhorn``).

Momentum centering subtracts a running mean of the teacher logits, so that no output
dominates over many steps. Sinkhorn-Knopp balances the targets of the current batch
instead: it rescales ``exp(t / tau_t)`` alternately so that every output receives the same
share of the batch's mass and every image a total of 1. DINOv2's code, on the K x B matrix
``Q`` (outputs x images, B counted over all processes)::

    Q = exp(t / tau_t).T;  Q /= Q.sum()
    repeat n:  Q /= Q.sum(dim=1) (all-reduced); Q /= K;  Q /= Q.sum(dim=0); Q /= B
    return (Q * B).T

Here the same iteration runs on ``log Q``, each normalisation a ``logsumexp``. In float32
``exp(t / tau_t)`` overflows once ``t / tau_t > 88`` (a logit above 3.5 at tau_t = 0.04,
common with the seed's unbounded linear head), and a whole row or column can underflow to
0 and turn the next division into 0/0. ``logsumexp`` subtracts the maximum of what it sums
before exp; that maximum is one constant per normalised row or column of ``Q``, which the
normalisation divides out again, so the result is DINOv2's in exact arithmetic.

Which shifts of the teacher logits leave the targets unchanged matters for that choice:

- a constant per output (``t + c`` for a K-vector c) scales one row of ``Q`` by one factor,
  which the first per-output normalisation removes exactly. So centering the teacher
  before Sinkhorn-Knopp has no effect, and the global maximum may be subtracted too.
- a constant per image scales a column of ``Q`` before the per-output sums, which weights
  that image more or less in them; only the converged result (many iterations) forgets it.
  Subtracting each image's maximum before exp (the usual softmax trick) would therefore
  change the targets by about 1e-2 after 3 iterations.

The constant factors 1/K and 1/B of DINOv2 cancel in the next normalisation and in the
final ``* B``; they are left out, so every output is normalised to mass 1 and every image
to mass 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _logsumexp_over_images(log_q: torch.Tensor) -> torch.Tensor:
    """``log sum_b exp(log_q[b, k])`` over the images of every process, shape ``(1, K)``."""
    lse = torch.logsumexp(log_q, dim=0, keepdim=True)
    if dist.is_available() and dist.is_initialized():
        # One gather of each process's own logsumexp (K numbers) and a logsumexp of those:
        # a sum of exps across processes without each one needing the same maximum.
        parts = [torch.empty_like(lse) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, lse)
        lse = torch.logsumexp(torch.cat(parts), dim=0, keepdim=True)
    return lse


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float,
                   n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets balanced over the outputs by Sinkhorn-Knopp.

    Args:
        teacher_logits: ``(rows, K)``: every image of every global view the teacher saw on
            this process (DINOv2 balances all global views together). Carries no gradient.
        teacher_temp: tau_t, the sharpening temperature.
        n_iterations: alternations of per-output and per-image normalisation (DINOv2: 3).

    Returns ``(rows, K)`` float32 probabilities: each row sums to 1, and with enough
    iterations each output receives ``rows / K`` of the total mass (over all processes
    when a process group is initialised).
    """
    if not teacher_temp > 0:
        raise ValueError(f"teacher_temp must be positive, got {teacher_temp}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an integer of at least 1, got {n_iterations!r}"
                         ": with none the rows would not be probabilities")
    if teacher_logits.ndim != 2 or teacher_logits.shape[0] < 1 or teacher_logits.shape[1] < 2:
        raise ValueError("teacher_logits must be (rows, K) with at least one row and K >= 2, "
                         f"got shape {tuple(teacher_logits.shape)}")
    log_q = teacher_logits.detach().float() / teacher_temp
    for _ in range(n_iterations):
        log_q = log_q - _logsumexp_over_images(log_q)  # each output: mass 1 over the batch
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # each image: mass 1
    return log_q.exp()


__all__ = ["sinkhorn_knopp"]
