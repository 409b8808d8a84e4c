"""Frozen features: the CLS token after the final norm, extracted in batches.

For the linear probe DINO also concatenates the CLS tokens of the last few blocks (each
through the final norm, as its reference ``get_intermediate_layers`` does): more of the
network's depth is visible to a linear classifier. Its ``--avgpool_patchtokens`` appends
the mean of the last block's normed patch tokens, for what the CLS token leaves out of
the patches (``patch_mean``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .. import distributed
from ..vit import ViT


@contextlib.contextmanager
def eval_precision(device: torch.device | str):
    """The numerics of every evaluation: float32 with autocast off (whatever the caller
    has on) and TF32 off for matmuls and cuDNN convolutions (cuDNN's default is on), so
    features, attention weights and k-NN similarities do not depend on the device or on
    where they are called from. On a GPU this costs speed (float32 instead of bf16)."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(_tf32_off())
        yield


@contextlib.contextmanager
def _tf32_off():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
    except RuntimeError:  # TF32 set through torch's newer fp32_precision API: left alone
        yield
        return
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def to_model_input(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """``uint8 (B, C, H, W)`` -> normalised float32 at ``size x size`` (bilinear,
    antialiased when shrinking)."""
    x = images.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    m, s = _normalisation(tuple(mean), tuple(std), x.device)
    return (x - m) / s


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device):
    """Mean and std as ``(1, C, 1, 1)`` tensors, built once per device: a tensor made
    from a Python list on CUDA is a blocking copy."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1),
            torch.tensor(std, device=device).view(1, -1, 1, 1))


def frozen_features(backbone: ViT, x: torch.Tensor, n_last_blocks: int = 1, *,
                    patch_mean: bool = False) -> torch.Tensor:
    """The CLS tokens of the last ``n_last_blocks`` blocks, each after the final norm,
    concatenated, the last block last: ``(B, n_last_blocks * D)``; with ``patch_mean``,
    followed by the mean over the last block's patch tokens after the final norm:
    ``(B, (n_last_blocks + 1) * D)``."""
    depth = len(backbone.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must lie in [1, {depth}] (the ViT's depth), got "
                         f"{n_last_blocks}")
    if n_last_blocks == 1 and not patch_mean:
        return backbone(x)
    x = backbone.tokens(x)
    out = []
    for i, block in enumerate(backbone.blocks):
        x, _ = block(x)
        if i >= depth - n_last_blocks:
            out.append(backbone.norm(x[:, 0]))
    if patch_mean:
        out.append(backbone.norm(x[:, 1:]).mean(dim=1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def extract_features(backbone: ViT, images: torch.Tensor, mean, std, *,
                     batch_size: int = 512, device: torch.device | str | None = None,
                     n_last_blocks: int = 1, patch_mean: bool = False,
                     _local: bool = False) -> torch.Tensor:
    """:func:`frozen_features` ``(N, (n_last_blocks + patch_mean) * D)`` in float32 on
    ``device`` (default: the backbone's); the defaults are the CLS token after the final
    norm. Computed under :func:`eval_precision`.

    Under ``torchrun`` every rank must call this together: each extracts a contiguous
    slice of the images and the slices are gathered in order, so every rank returns all
    N features."""
    device = torch.device(device) if device else next(backbone.parameters()).device
    info = distributed.current()
    if info.enabled and not _local:
        per = -(-images.shape[0] // info.world_size)
        mine = images[info.rank * per:(info.rank + 1) * per]
        return distributed.all_gather_cat(extract_features(
            backbone, mine, mean, std, batch_size=batch_size, device=device,
            n_last_blocks=n_last_blocks, patch_mean=patch_mean, _local=True))
    was_training = backbone.training
    backbone.eval()
    size = backbone.cfg.image_size
    out = []
    with eval_precision(device):
        for i in range(0, images.shape[0], batch_size):
            x = to_model_input(images[i:i + batch_size].to(device, non_blocking=True),
                               mean, std, size)
            out.append(frozen_features(backbone, x, n_last_blocks,
                                       patch_mean=patch_mean).float())
    backbone.train(was_training)
    if not out:
        return torch.zeros(0, (n_last_blocks + patch_mean) * backbone.cfg.dim,
                           device=device)
    return torch.cat(out)
