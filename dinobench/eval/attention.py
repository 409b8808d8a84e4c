"""Does the attention find the object? CLS attention against foreground masks.

DINO (Caron et al. 2021, Sec. 4.2.1 and Table 6) thresholds each head's last-block CLS
attention to keep 60% of its mass and compares that mask with the object's mask by
Jaccard similarity. dinobench scores every image with a foreground mask this way, and adds
two readings that need no threshold: the attention mass inside the foreground and the
pointing game (is the most attended patch on the object?).

Conventions (DESIGN.md, "Measures"):

- A map is a row over the last dimension; callers flatten the patch grid.
- A patch is foreground when at least half of its pixels are.
- Scores are in percent, averaged over the images whose foreground covers at least one
  patch (an image with no foreground patch has no object to find at patch level; the
  number of such images is reported, not hidden).
- Uniform attention is the chance reference: mass inside = pointing game = the
  foreground's area fraction, and Jaccard = the expected Jaccard of a uniformly random
  set of patches as large as the mask a uniform map gets (every patch ties, so any
  fixed tie-break would favour one corner of the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from ..vit import ViT
from .features import eval_precision, to_model_input

OVERLAP_METRICS = ("jaccard_best_head", "jaccard_mean_head", "mass_inside", "pointing_game")


def attention_mask(attention: torch.Tensor, keep_mass: float = 0.6) -> torch.Tensor:
    """The smallest set of positions holding ``keep_mass`` of each row's attention.

    ``attention``: ``(..., N)`` non-negative weights, one map per row of the last
    dimension (flatten a ``(gh, gw)`` grid first). Returns a boolean tensor of the same
    shape. The rule is DINO's: sort a row ascending, normalise it to sum 1, take the
    cumulative sum, keep the positions whose cumulative sum exceeds ``1 - keep_mass``.

    The arithmetic runs in float64 and the cumulative sum is divided by its own last
    element, so the largest weight is always kept and a mask is never empty. Ties: the
    sort is stable, so among equal weights straddling the threshold the ones at later
    positions (higher index) are kept; a uniform row of N keeps its last
    ``N - floor(N * (1 - keep_mass))`` positions. Zero weights are never kept unless
    ``keep_mass`` needs them (they add no mass, so with ``keep_mass = 1`` the mask is the
    support of the row).
    """
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must lie in (0, 1], got {keep_mass}")
    if not attention.is_floating_point():
        raise ValueError(f"attention must be a floating-point tensor, got {attention.dtype}")
    if attention.ndim == 0 or attention.shape[-1] == 0:
        raise ValueError(f"attention must have a non-empty last dimension, got shape "
                         f"{tuple(attention.shape)}")
    a = attention.detach().to(torch.float64)
    bad = (~torch.isfinite(a)).any(-1) | (a < 0).any(-1) | (a.sum(-1) <= 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {bad.numel()} attention rows are all zero, negative or "
            "not finite, so they have no mass to threshold; pass softmax attention "
            "weights (for example ViT.cls_attention) flattened over the patch grid")
    weights, order = torch.sort(a, dim=-1, stable=True)  # ascending
    cum = weights.cumsum(-1)
    cum = cum / cum[..., -1:]
    keep_sorted = cum > 1.0 - keep_mass
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def jaccard(a: torch.Tensor, b: torch.Tensor, dim: int | tuple[int, ...] | None = -1
            ) -> torch.Tensor:
    """Jaccard similarity (intersection over union) of boolean masks, float64.

    Reduced over ``dim`` (default: the last dimension, one score per row; a tuple of
    dims for 2-D masks; ``None``: one global score over all elements). Two empty sets
    are identical, so their Jaccard is defined as 1.0 (never NaN).
    """
    if a.dtype != torch.bool or b.dtype != torch.bool:
        raise ValueError(f"jaccard needs boolean masks, got {a.dtype} and {b.dtype}; "
                         "threshold the maps first (attention_mask)")
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    inter, union = a & b, a | b
    if dim is None:
        inter, union = inter.sum(), union.sum()
    else:
        inter, union = inter.sum(dim), union.sum(dim)
    inter, union = inter.to(torch.float64), union.to(torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _cover(size: int, grid: int) -> torch.Tensor:
    """``(grid, size)`` float64: the share of patch ``g`` that pixel ``y`` covers, when
    ``grid`` equal patches span ``size`` pixels (each pixel the interval [y, y + 1))."""
    edges = torch.arange(grid + 1, dtype=torch.float64) * (size / grid)
    pixels = torch.arange(size, dtype=torch.float64)
    overlap = (torch.minimum(pixels + 1, edges[1:, None])
               - torch.maximum(pixels, edges[:-1, None])).clamp(min=0)
    return overlap / (size / grid)


def patch_foreground(pixel_masks: torch.Tensor, grid: int, min_fraction: float = 0.5
                     ) -> torch.Tensor:
    """Pixel masks ``(N, H, W)`` bool -> patch masks ``(N, grid, grid)``: a patch is
    foreground when at least ``min_fraction`` of its area is.

    The patches split the image into ``grid`` equal parts per side whether or not the
    grid divides the side (a model run at ``--image-size 20 --grid 5`` sees a 32-px
    dataset resized, so its patches cover 6.4 of the masks' pixels): a pixel cut by a
    patch border counts for the share of it inside."""
    if pixel_masks.ndim != 3:
        raise ValueError(f"pixel masks must be (N, H, W), got {tuple(pixel_masks.shape)}")
    _, h, w = pixel_masks.shape
    rows, cols = _cover(h, grid), _cover(w, grid)
    frac = torch.cat([torch.einsum("gh,nhw,kw->ngk", rows, m.to(torch.float64), cols)
                      for m in pixel_masks.split(1024)] or [torch.zeros(0, grid, grid)])
    # Shares are sums of float64 fractions: round off the last bits before the
    # threshold, so a patch exactly half covered counts as half.
    return frac.round(decimals=9) >= min_fraction


@dataclass
class OverlapScores:
    """Per-image scores ``(N,)`` (fractions in [0, 1]) and which images count."""

    jaccard_best_head: torch.Tensor
    jaccard_mean_head: torch.Tensor
    mass_inside: torch.Tensor
    pointing_game: torch.Tensor
    fg_area: torch.Tensor  # foreground patches / all patches
    scored: torch.Tensor  # bool: the foreground covers at least one patch

    def summary(self) -> dict[str, float]:
        """Means over the scored images in percent, plus image counts."""
        n = int(self.scored.sum())
        out = {}
        for name in (*OVERLAP_METRICS, "fg_area"):
            v = getattr(self, name)[self.scored]
            out[name] = 100.0 * float(v.mean()) if n else math.nan
        out["n_scored"] = n
        out["n_images"] = int(self.scored.numel())
        return out


def _check_foreground(foreground: torch.Tensor, n: int, p: int) -> torch.Tensor:
    f = foreground.reshape(foreground.shape[0], -1) if foreground.ndim > 1 else foreground
    if foreground.dtype != torch.bool or f.shape != (n, p):
        raise ValueError(f"foreground must be a bool mask with {n} images of {p} patches, "
                         f"got {foreground.dtype} {tuple(foreground.shape)}")
    return f


def overlap_scores(attention: torch.Tensor, foreground: torch.Tensor,
                   keep_mass: float = 0.6) -> OverlapScores:
    """Score attention ``(N, heads, gh, gw)`` against patch foreground ``(N, gh, gw)``.

    Jaccard per head of the ``keep_mass`` mask with the foreground, then the best head
    and the mean over heads per image; mass inside = foreground share of each normalised
    head map, mean over heads; pointing game = is the argmax of the head-mean map a
    foreground patch. When several patches tie for the maximum the hit counts as the
    share of tied patches that are foreground (the expected hit of a random tie-break),
    which makes a uniform map score its area fraction, not whatever a corner holds.
    """
    if attention.ndim != 4:
        raise ValueError(f"attention must be (N, heads, gh, gw), got {tuple(attention.shape)}")
    n, heads = attention.shape[:2]
    a = attention.reshape(n, heads, -1).to(torch.float64)  # (N, heads, P)
    f = _check_foreground(foreground, n, a.shape[-1]).to(a.device)
    masks = attention_mask(a, keep_mass)  # validates the maps, too
    jac = jaccard(masks, f[:, None, :].expand_as(masks))  # (N, heads)
    p = a / a.sum(-1, keepdim=True)
    mass = (p * f[:, None, :]).sum(-1).mean(-1)
    mean_map = p.mean(1)  # (N, P)
    at_max = mean_map == mean_map.amax(-1, keepdim=True)
    hit = (at_max & f).sum(-1) / at_max.sum(-1)
    return OverlapScores(jac.amax(-1).cpu(), jac.mean(-1).cpu(), mass.cpu(),
                         hit.to(torch.float64).cpu(), f.double().mean(-1).cpu(),
                         f.any(-1).cpu())


@cache
def expected_random_jaccard(n: int, fg: int, size: int) -> float:
    """E[J(S, F)] for S a uniformly random ``size``-subset of ``n`` positions and F a
    fixed set of ``fg`` positions. The overlap X is hypergeometric, and
    ``J = X / (size + fg - X)``; 0/0 (both empty) counts as 1, as in :func:`jaccard`."""
    total = math.comb(n, size)
    e = 0.0
    for x in range(max(0, size + fg - n), min(size, fg) + 1):
        union = size + fg - x
        j = x / union if union else 1.0
        e += math.comb(fg, x) * math.comb(n - fg, size - x) / total * j
    return e


def uniform_overlap(foreground: torch.Tensor, keep_mass: float = 0.6) -> OverlapScores:
    """The scores of uniform attention (the chance reference), from the masks alone.

    Every head of a uniform map is the same, so best head = mean over heads. Mass inside
    and the pointing game equal the foreground's area fraction. Jaccard is the expected
    Jaccard of a random set of patches as large as ``attention_mask`` keeps for a uniform
    map (every patch ties, so the mask's position is arbitrary).
    """
    n = foreground.shape[0]
    f = foreground.reshape(n, -1)
    p = f.shape[-1]
    size = int(attention_mask(torch.ones(p, dtype=torch.float64), keep_mass).sum())
    counts = f.sum(-1).tolist()
    jac = torch.tensor([expected_random_jaccard(p, c, size) for c in counts],
                       dtype=torch.float64)
    area = f.double().mean(-1)
    return OverlapScores(jac, jac.clone(), area.clone(), area.clone(), area.clone(),
                         f.any(-1))


@torch.no_grad()
def cls_attention_maps(backbone: ViT, images: torch.Tensor, mean, std, *,
                       batch_size: int = 256, device: torch.device | str | None = None
                       ) -> torch.Tensor:
    """Last-block CLS-to-patch attention of every head for ``uint8`` images, in batches
    on the device: ``(N, heads, gh, gw)`` float32 on the CPU, each map summing to 1.
    Computed under :func:`~dinobench.eval.features.eval_precision`."""
    device = torch.device(device) if device else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = []
    with eval_precision(device):  # float32 logits: bf16 keeps 8 significant bits
        for i in range(0, images.shape[0], batch_size):
            x = to_model_input(images[i:i + batch_size].to(device), mean, std,
                               backbone.cfg.image_size)
            out.append(backbone.cls_attention(x).float().cpu())
    backbone.train(was_training)
    g = backbone.cfg.grid
    return torch.cat(out) if out else torch.zeros(0, backbone.cfg.heads, g, g)
