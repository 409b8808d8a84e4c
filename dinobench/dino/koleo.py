"""The KoLeo regulariser (Sablayrolles et al. 2019, arXiv:1806.03198; DINOv2, Oquab et al.
2023, Sec. 4): the negative log distance from each feature to its nearest neighbour in
the batch, on L2-normalised features.

DINO's loss only asks that the views of one image agree; nothing in it keeps different
images apart in the backbone's feature space, and a k-NN reads exactly that space. KoLeo
is a differential entropy estimate of the features: minimising it pushes each image away
from its closest neighbour, spreading the batch over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over ``features (N, D)`` (N >= 2), each row
    L2-normalised first, ``nn(i)`` the nearest other row. Computed in float32.

    The neighbour is chosen without gradient (the argmax of the cosine similarity, as
    DINOv2); the distance to it carries the gradient."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"KoLeo needs a batch of at least 2 feature vectors (N, D), got "
                         f"{tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-3.0)  # below any cosine: a row is never its own neighbour
        nearest = sim.argmax(dim=1)
    distance = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(distance + eps).mean()
