"""Projection heads g that map a backbone feature to K logits, and the backbone+head pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..vit import ViT
from .batch_norm import GlobalBatchNorm


class SeedHead(nn.Module):
    """The seed's head: one linear map from the CLS feature to K outputs."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if out_dim < 2:
            raise ValueError(f"out_dim (K) must be at least 2, got {out_dim}")
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return []  # nothing is frozen in the seed's head


class DINOHead(nn.Module):
    """The official head: a 3-layer MLP to a bottleneck, L2 normalisation, and a
    weight-normalised linear layer (no bias) to K outputs.

    ``batch_norm`` puts a batch norm after each hidden layer (the reference code's
    ``use_bn_in_head``). It always normalises with the statistics of the global batch in
    hand, for the teacher too, and keeps no running averages (see ``batch_norm.py``). On small
    data this is what lets the teacher's outputs differ between images from the first
    step: a randomly initialised ViT maps every image to nearly the same CLS feature, so
    the centred teacher logits are nearly zero and the targets nearly uniform, and the
    student learns to be uniform too (the uniform collapse). Normalising over the batch
    scales those small differences up to unit variance.

    The last layer is weight-normalised: row k is ``g_k V_k / ||V_k||``, written out so
    the module stays free of ``weight_norm`` hooks and friendly to ``torch.compile``. With
    ``norm_last_layer`` (the reference code's default) every ``g_k`` is fixed at 1, so the
    logits are cosines in [-1, 1]. Without it ``g`` is a parameter ``(K, 1)`` that starts
    at 1 and is learnt (the reference code's setting for ViT-S/16): the logits' scale, and
    so how sharp the teacher can be at a given temperature, is learnt with it.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, batch_norm: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        if out_dim < 2:
            raise ValueError(f"out_dim (K) must be at least 2, got {out_dim}")

        def norm() -> nn.Module:
            return GlobalBatchNorm(hidden_dim) if batch_norm else nn.Identity()

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), norm(), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_layer_v, a=5**0.5)  # nn.Linear's default
        # Only without norm_last_layer: a fixed g would be a state-dict entry that older
        # checkpoints lack.
        self.last_layer_g = (None if norm_last_layer
                             else nn.Parameter(torch.ones(out_dim, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_layer_v, dim=-1)
        return F.linear(x, w if self.last_layer_g is None else self.last_layer_g * w)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters kept frozen during the first epoch(s), which stabilises training."""
        return [self.last_layer_v] + ([] if self.last_layer_g is None
                                      else [self.last_layer_g])


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, batch_norm: bool = False,
               norm_last_layer: bool = True) -> nn.Module:
    if kind == "seed":
        if batch_norm:
            raise ValueError("batch norm is an option of the official head's MLP; the "
                             "seed head is one linear map")
        if not norm_last_layer:
            raise ValueError("norm_last_layer is an option of the official head's last "
                             "layer; the seed head is one linear map")
        return SeedHead(in_dim, out_dim)
    if kind == "official":
        return DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, batch_norm,
                        norm_last_layer)
    raise ValueError(f"unknown head {kind!r}; choose 'seed' or 'official'")


class DINOModel(nn.Module):
    """Backbone and head. Called with a list of crop batches (one tensor per crop size),
    it runs the backbone once per size and returns the logits of all crops concatenated
    in the order given: ``(sum of batch sizes, K)``; with ``return_features`` also the
    backbone's CLS features they came from, ``(sum of batch sizes, D)``.

    With ``patches`` (iBOT) it returns ``(logits, features, patch_logits)``: the head's
    logits for every patch token of the first crop batch, ``(B0, N, K)``, computed in a
    head call of their own, so the CLS logits (and the head's batch norm over them) are
    the same as without. ``masks`` ``bool (B0, N)`` hides those patches of the first
    crop batch behind the backbone's mask token first."""

    def __init__(self, backbone: ViT, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor], return_features: bool = False,
                patches: bool = False, masks: torch.Tensor | None = None):
        if not patches:
            if masks is not None:
                raise ValueError("masks need patches=True: a hidden patch is read back "
                                 "from the patch logits")
            features = torch.cat([self.backbone(c) for c in crops])
            logits = self.head(features)
            return (logits, features) if return_features else logits
        tokens = self.backbone.forward_tokens(crops[0], masks)  # (B0, 1 + N, D)
        features = torch.cat([tokens[:, 0]] + [self.backbone(c) for c in crops[1:]])
        patch_tokens = tokens[:, 1:]
        patch_logits = self.head(patch_tokens.flatten(0, 1))
        return self.head(features), features, patch_logits.unflatten(0, patch_tokens.shape[:2])
