"""The raw-pixel reference: the images themselves as features.

Every table sets a learnt representation beside ``pixels``: the input normalised as the
model sees it (per-channel mean and std of the dataset spec) at its stored size, flattened
to ``(N, C * H * W)``. Where the model reads the images at another size
(``--image-size``), it is also set beside ``pixels-<size>px``: the pixels resized as the
model's input is. k-NN and the linear probe then run on them exactly as on a backbone's
features, so a representation that does not beat them has learnt nothing k-NN or a
linear map could use that the pixels did not already hold.
"""

from __future__ import annotations

import torch

from .features import to_model_input


@torch.no_grad()
def pixel_features(images: torch.Tensor, mean, std, *, size: int | None = None,
                   batch_size: int = 1024, device: torch.device | str | None = None
                   ) -> torch.Tensor:
    """``uint8 (N, C, H, W)`` -> normalised float32 ``(N, C * size * size)`` on ``device``
    (default: the images' device). ``size`` None keeps the stored side; another side
    resizes as the model's input is resized (bilinear, antialiased when shrinking)."""
    device = torch.device(device) if device else images.device
    size = size or images.shape[-1]
    out = [to_model_input(images[i:i + batch_size].to(device), mean, std, size).flatten(1)
           for i in range(0, images.shape[0], batch_size)]
    if not out:
        return torch.zeros(0, images.shape[1] * size * size, device=device)
    return torch.cat(out)
