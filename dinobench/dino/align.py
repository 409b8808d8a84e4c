"""Feature alignment: each student view's CLS feature regressed onto the teacher's CLS
feature of another global view of the same image, on the unit sphere (the "alignment"
half of Wang and Isola 2020, arXiv:2005.10242, with BYOL's EMA target, Grill et al. 2020).

DINO asks the views of an image to agree only through the head's softmax over K outputs.
When the teacher's outputs are nearly uniform per image (as on small data, where a few
tenths of a nat separate one image's target from another's), that agreement puts little
pull on the backbone, and the k-NN reads the backbone. This term asks for the agreement
in the space the k-NN reads. On its own it collapses (every image to one point); beside
KoLeo, which spreads the batch, the two are an alignment-plus-uniformity objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor, n_global: int,
                   eps: float = 1e-8) -> torch.Tensor:
    """Mean over DINO's view pairs of ``||s_v - t_i||^2`` (``= 2 - 2 cos``), batch-averaged.

    ``student`` ``(V * B, D)``: the CLS features of every view, view-major (the global
    views first); ``teacher`` ``(n_global * B, D)``: the teacher's of the global views,
    held fixed (no gradient flows into it). The pairs are those of the DINO loss: teacher
    view ``i`` with every student view ``v != i``. Rows are L2-normalised first; computed
    in float32."""
    if teacher.shape[0] % n_global or student.shape[0] % (teacher.shape[0] // n_global):
        raise ValueError(f"alignment needs view-major features of one batch: teacher "
                         f"{tuple(teacher.shape)} for {n_global} global views, student "
                         f"{tuple(student.shape)}")
    b = teacher.shape[0] // n_global
    s = F.normalize(student.float(), dim=-1, eps=eps).unflatten(0, (-1, b))  # (V, B, D)
    t = F.normalize(teacher.detach().float(), dim=-1, eps=eps).unflatten(0, (n_global, b))
    cos = torch.einsum("vbd,ibd->ivb", s, t)  # (n_global, V, B)
    keep = ~torch.eye(n_global, s.shape[0], dtype=torch.bool, device=cos.device)
    return (2.0 - 2.0 * cos[keep]).mean()
