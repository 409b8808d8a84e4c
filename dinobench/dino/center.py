"""Centering of the teacher output (DINO, Eq. 4): a running mean of teacher logits.

Subtracting the center keeps one output from dominating (collapse to one dimension);
sharpening with a low teacher temperature keeps the output from going uniform.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor,
                  momentum: float) -> torch.Tensor:
    """``momentum * center + (1 - momentum) * mean of teacher_logits over rows``.

    When a process group is initialised the mean runs over the rows of every process, so
    all ranks keep the same center. Returns a new float32 tensor shaped like ``center``.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must lie in [0, 1], got {momentum}")
    rows = teacher_logits.detach().float()
    batch_sum = rows.sum(dim=0)
    count = rows.shape[0]  # known on the host: no tensor, no copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)  # every rank holds the same number of rows
        count *= dist.get_world_size()
    batch_mean = (batch_sum / count).reshape(center.shape)
    return center.float() * momentum + batch_mean * (1.0 - momentum)
