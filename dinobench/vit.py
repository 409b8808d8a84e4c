"""The seed's compact Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929).

Pre-norm blocks, a CLS token and learnt positional embeddings on a fixed patch grid
(``patch = image_size / grid``). Crops of another size keep the patch size and get
positional embeddings interpolated to their grid, as in DINO. Attention runs through
``F.scaled_dot_product_attention`` (fused kernels) for training; the explicit path,
used only to read attention maps, computes the same thing and returns the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32  # side of a global crop in pixels
    grid: int = 8  # patches per side of a global crop; patch = image_size / grid
    in_chans: int = 3  # 1 (MNIST, digits) or 3 (CIFAR-10, STL-10)
    dim: int = 192  # hidden size D
    depth: int = 12  # transformer blocks
    heads: int = 4  # attention heads
    mlp_dim: int = 768  # MLP hidden size
    drop_path: float = 0.0  # stochastic depth rate, rising linearly to this in the last block

    def __post_init__(self):
        if self.image_size < 1 or self.grid < 1:
            raise ConfigError(f"image size and grid must be positive, got {self.image_size} "
                              f"and {self.grid}")
        if self.image_size % self.grid:
            raise ConfigError(f"--grid {self.grid} does not divide --image-size "
                              f"{self.image_size}: patches must tile the image; pick a grid "
                              "that divides it")
        if self.dim % self.heads:
            raise ConfigError(f"--dim {self.dim} must be a multiple of --heads {self.heads}")

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a random subset of samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        if keep == 0.0:
            return torch.zeros_like(x)
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D/heads)
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if return_attention:
            # Explicit path; softmax in float32 so the weights sum to 1 under autocast.
            logits = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
            attn = logits.float().softmax(dim=-1)
            out = attn.to(v.dtype) @ v  # (B, heads, N, D/heads)
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj(out), attn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class ViT(nn.Module):
    """Backbone: images ``(B, C, H, W)`` -> CLS feature after the final norm ``(B, D)``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, cfg.dim))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_dim, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embeddings ``(1, 1 + gh*gw, D)`` for a crop of ``gh x gw`` patches."""
        g = self.cfg.grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        # (1, g*g, D) -> (1, D, g, g) for 2-D bicubic resampling, then back.
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                  align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS prepended and positions added: ``(B, 1 + N, D)``."""
        p = self.cfg.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"crop {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {p}")
        x = self.patch_embed(x)  # (B, D, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed_for(gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x[:, 0])

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit attention in every block. Returns the CLS feature ``(B, D)`` and the
        last block's attention weights ``(B, heads, 1 + N, 1 + N)`` (float32)."""
        x = self.tokens(x)
        attn = None
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attention=i == len(self.blocks) - 1)
        return self.norm(x[:, 0]), attn

    def forward_all_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS feature with the explicit attention path in every block (for tests)."""
        x = self.tokens(x)
        for block in self.blocks:
            x, _ = block(x, return_attention=True)
        return self.norm(x[:, 0])

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Last block, CLS query, per head, over the patch tokens: ``(B, heads, gh, gw)``.

        Each row is renormalised over the patches (the CLS-to-CLS weight is dropped), so a
        map sums to 1 over the grid.
        """
        _, attn = self.forward_with_attention(x)
        cls_to_patch = attn[:, :, 0, 1:]  # (B, heads, N)
        cls_to_patch = cls_to_patch / cls_to_patch.sum(-1, keepdim=True)
        n = cls_to_patch.shape[-1]
        gh = x.shape[-2] // self.cfg.patch_size
        return cls_to_patch.reshape(x.shape[0], self.cfg.heads, gh, n // gh)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(cfg: ViTConfig, n_tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one forward pass of one image of ``n_tokens`` tokens,
    counting the matmuls and the patch embedding; norms and softmax are left out."""
    D, M = cfg.dim, cfg.mlp_dim
    per_block = 2 * n_tokens * (4 * D * D + 2 * D * M) + 2 * 2 * n_tokens * n_tokens * D
    return cfg.depth * per_block + 2 * (n_tokens - 1) * cfg.in_chans * cfg.patch_size**2 * D


