"""Per-tensor gradient clipping (the DINO reference code's rule) in few kernel launches.

Each gradient ``g_i`` is scaled by ``s_i = min(1, c / (||g_i|| + 1e-6))``. The norms come
from one fused ``_foreach_norm``. Applying one device scalar per tensor is the part
torch has no fused kernel for: ``_foreach_mul_(grads, [s_0, s_1, ...])`` takes its fast
(multi-tensor) path only when every pair of tensors has the same shape and strides, and a
0-d (or 1-element) scale never matches a gradient, so it falls back to one ``mul_`` per
tensor; the ``_foreach_mul_(grads, s)`` overload takes a single 0-d tensor for all of
them. On CUDA the scales are therefore spread into a buffer shaped like the gradients
(one ``index_select`` into a buffer whose per-tensor views are built once per layout),
and then multiplied in with the fast path: a handful of launches for any number of
tensors, for about three extra reads and writes of the gradients' size. On a CPU the
per-tensor loop is what every ``_foreach`` op runs anyway, so the scales are applied as
they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

EPS = 1e-6  # added to each norm, as in the DINO reference code
_LAYOUTS: OrderedDict[tuple, _Spread] = OrderedDict()
_MAX_LAYOUTS = 4  # each holds two tensors of the gradients' size


class _Spread:
    """A buffer with one view per gradient, and the index that fills view ``i`` with
    ``scales[i]``."""

    def __init__(self, grads: list[torch.Tensor]):
        numels = [g.numel() for g in grads]
        # Built on the host, copied once: repeat_interleave on the device with a tensor of
        # counts would wait for the GPU to learn the output size.
        self.index = torch.repeat_interleave(
            torch.arange(len(grads), dtype=torch.int32),
            torch.tensor(numels)).to(grads[0].device)
        self.buffer = torch.empty(sum(numels), dtype=grads[0].dtype, device=grads[0].device)
        self.views = [v.view(g.shape) for v, g in zip(self.buffer.split(numels), grads)]


def _spread(grads: list[torch.Tensor]) -> _Spread:
    key = (grads[0].device, grads[0].dtype, tuple(g.shape for g in grads))
    spread = _LAYOUTS.get(key)
    if spread is None:
        spread = _LAYOUTS[key] = _Spread(grads)
        while len(_LAYOUTS) > _MAX_LAYOUTS:
            _LAYOUTS.popitem(last=False)
    else:
        _LAYOUTS.move_to_end(key)
    return spread


@torch.no_grad()
def clip_scales(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``(n,)`` float32 factors ``min(1, max_norm / (||g_i|| + 1e-6))``, on the device."""
    norms = torch.stack(torch._foreach_norm(grads)).float()
    return (max_norm / (norms + EPS)).clamp_(max=1.0)


@torch.no_grad()
def scale_each_(grads: list[torch.Tensor], scales: torch.Tensor, *,
                spread: bool | None = None) -> None:
    """``grads[i] *= scales[i]`` for every i, in place, without host synchronisation.
    ``spread``: through the buffer (default on CUDA) or one multiply per tensor."""
    if spread is None:
        spread = grads[0].is_cuda
    if not spread:
        torch._foreach_mul_(grads, scales.to(grads[0].dtype).unbind())
        return
    s = _spread(grads)
    torch.index_select(scales.to(s.buffer.dtype), 0, s.index, out=s.buffer)
    torch._foreach_mul_(grads, s.views)


def clip_grads_per_tensor_(grads: list[torch.Tensor], max_norm: float, *,
                           spread: bool | None = None) -> None:
    """Clip each gradient to norm at most ``max_norm``, in place."""
    if grads and max_norm > 0:
        scale_each_(grads, clip_scales(grads, max_norm), spread=spread)


@torch.no_grad()
def clip_per_tensor_(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm at most ``max_norm`` (the DINO reference
    code clips per parameter, not globally); parameters without a gradient are skipped.
    A few fused kernels on CUDA, no host synchronisation."""
    clip_grads_per_tensor_([p.grad for p in params if p.grad is not None], max_norm)
