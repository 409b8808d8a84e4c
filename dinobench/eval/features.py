"""Frozen features: the CLS token after the final norm, extracted in batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vit import ViT


def to_model_input(images: torch.Tensor, mean, std, size: int) -> torch.Tensor:
    """``uint8 (B, C, H, W)`` -> normalised float32 at ``size x size`` (bilinear,
    antialiased when shrinking)."""
    x = images.float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(backbone: ViT, images: torch.Tensor, mean, std, *,
                     batch_size: int = 512, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """CLS features ``(N, D)`` in float32 on ``device`` (default: the backbone's)."""
    device = torch.device(device) if device else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    size = backbone.cfg.image_size
    out = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, images.shape[0], batch_size):
            x = to_model_input(images[i:i + batch_size].to(device, non_blocking=True),
                               mean, std, size)
            out.append(backbone(x).float())
    backbone.train(was_training)
    if not out:
        return torch.zeros(0, backbone.cfg.dim, device=device)
    return torch.cat(out)
