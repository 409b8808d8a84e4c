"""Batch normalisation over the whole global batch, in training and evaluation alike.

The head's batch norm (``--head-bn``) normalises each feature with the mean and variance
of the batch in hand: for the student and for the teacher, which runs in eval mode and
has no running averages worth keeping (an EMA of the student's would describe another
network). Under ``torchrun`` "the batch" must be the global one, or a run on N processes
would normalise over slices and differ from the same run on one. ``nn.SyncBatchNorm``
synchronises only in training mode, so the teacher would normalise per process; this
module sums the statistics over every process whenever a process group is initialised,
through an all-reduce that autograd differentiates (its backward all-reduces the
gradient of the sums, which is what makes the student's gradient the one of the global
batch once DDP averages the parameter gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GlobalBatchNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per feature, with the mean and the
    biased variance of the rows of every process; ``x`` is ``(rows, features)``."""

    def __init__(self, features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"batch norm needs (rows >= 2, features), got {tuple(x.shape)}")
        # Statistics in float64, in two passes (the mean, then the squared deviations
        # from it): early in training the features barely differ between images, so the
        # variance is tiny next to the squared mean and E[x^2] - mean^2 in float32 would
        # be mostly rounding, and this norm exists to scale those small differences up.
        # Float64 also makes the sum's order (one process or several) irrelevant.
        xd = x.double()
        rows = self._all_reduce(xd.new_tensor(float(x.shape[0])).reshape(1))
        mean = self._all_reduce(xd.sum(0)) / rows
        var = self._all_reduce(((xd - mean) ** 2).sum(0)) / rows
        y = (xd - mean) * torch.rsqrt(var + self.eps)
        return (y.to(self.weight.dtype) * self.weight + self.bias).to(x.dtype)

    @staticmethod
    def _all_reduce(t: torch.Tensor) -> torch.Tensor:
        """The sum over processes, differentiable (its backward all-reduces the
        gradient); ``t`` itself without a process group."""
        if dist.is_available() and dist.is_initialized():
            from torch.distributed.nn.functional import all_reduce
            return all_reduce(t)
        return t
