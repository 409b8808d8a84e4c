"""The seed's compact Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929).

Pre-norm blocks, a CLS token and learnt positional embeddings on a fixed patch grid
(``patch = image_size / grid``), embedded by one linear map per patch or, with
``stem="conv"``, by a few strided convolutions (:class:`ConvStem`). Crops of another
size keep the patch size and get positional embeddings interpolated to their grid, as
in DINO: bicubic, the values of ``F.interpolate(..., size=grid, mode="bicubic",
align_corners=False)``, applied as one fixed matrix per pair of grids so that forward
and backward are matmuls (the backward of CUDA's bicubic interpolation has no
deterministic kernel). Attention runs through
``F.scaled_dot_product_attention`` (fused kernels) for training; the explicit path,
used only to read attention maps, computes the same thing and returns the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import STEMS
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
    # Standard deviation of the initial positional embeddings (truncated at +-2 absolute,
    # as timm and DINO do for 0.02). At 0.02 they are about 25x smaller than the patch
    # embeddings (the convolution's default init), so at first the network sees a bag of
    # patches; on a 4x4 grid where a digit's shape is its layout, larger ones help.
    pos_embed_std: float = 0.02
    # How pixels become tokens: "patch", one linear map per patch (a p x p convolution of
    # stride p, as ViT); "conv", a stack of 3x3 stride-2 convolutions (see ConvStem).
    stem: str = "patch"
    # A learnt token that stands in for hidden patches (iBOT's masked views); created only
    # when a recipe asks for it, so every other backbone keeps its parameters.
    mask_token: bool = False

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
        if not self.pos_embed_std > 0:
            raise ConfigError(f"--pos-embed-std must be positive, got {self.pos_embed_std}")
        if self.stem not in STEMS:
            raise ConfigError(f"--stem must be one of {', '.join(STEMS)}, got {self.stem!r}")
        p = self.image_size // self.grid
        if self.stem == "conv" and (p < 2 or p & (p - 1)):
            raise ConfigError(f"--stem conv halves the image once per convolution, so the "
                              f"patch side (--image-size / --grid = {p}) must be a power of "
                              "2 of at least 2; pick a grid that gives one, or --stem patch")

    @classmethod
    def for_recipe(cls, recipe, image_size: int, grid: int, in_chans: int) -> ViTConfig:
        """The backbone a recipe describes (its dim, depth, heads, mlp_dim, pos_embed_std
        and stem) on global crops of ``image_size`` px cut into ``grid`` x ``grid``
        patches. Drop path is left at 0: only the student gets the recipe's."""
        return cls(image_size=image_size, grid=grid, in_chans=in_chans, dim=recipe.dim,
                   depth=recipe.depth, heads=recipe.heads, mlp_dim=recipe.mlp_dim,
                   pos_embed_std=recipe.pos_embed_std, stem=recipe.stem,
                   mask_token=recipe.ibot_weight > 0)

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid


# Keys (1981) cubic convolution with a = -0.75, the kernel of PyTorch's bicubic mode.
_CUBIC_A = -0.75


def _cubic_taps(t: torch.Tensor) -> torch.Tensor:
    """Weights ``(..., 4)`` of the taps at ``floor(x) - 1 .. floor(x) + 2`` for the
    fractional offsets ``t = x - floor(x)``."""
    a = _CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def bicubic_matrix_1d(n_in: int, n_out: int, device=None) -> torch.Tensor:
    """``(n_out, n_in)`` float64 matrix of 1-D bicubic resampling with half-pixel centres
    (``align_corners=False``): output ``i`` samples input position
    ``(i + 0.5) * n_in / n_out - 0.5``; taps beyond the edge take the edge value. Built
    from ``arange`` and comparisons only (no scatter, no host copy)."""
    x = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    x0 = torch.floor(x)
    taps = x0[:, None] + torch.arange(-1, 3, device=device, dtype=torch.float64)
    taps = taps.clamp(0, n_in - 1)  # (n_out, 4) input index of each tap
    cols = torch.arange(n_in, device=device, dtype=torch.float64)
    hit = (taps[..., None] == cols).to(torch.float64)  # (n_out, 4, n_in)
    return (hit * _cubic_taps(x - x0)[..., None]).sum(1)


def bicubic_matrix_2d(src: tuple[int, int], dst: tuple[int, int], device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(dst_h * dst_w, src_h * src_w)``: the row-major flattened grid times this matrix
    is ``F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)``. Bicubic
    resampling is separable, so the matrix is the Kronecker product of the 1-D ones."""
    mh = bicubic_matrix_1d(src[0], dst[0], device)
    mw = bicubic_matrix_1d(src[1], dst[1], device)
    m = mh[:, None, :, None] * mw[None, :, None, :]  # (dh, dw, sh, sw)
    return m.reshape(dst[0] * dst[1], src[0] * src[1]).to(dtype)


_RESIZE_CACHE: dict[tuple, torch.Tensor] = {}


def _compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else bool(torch._dynamo.is_compiling())


def pos_resize_matrix(src: tuple[int, int], dst: tuple[int, int], device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """:func:`bicubic_matrix_2d`, built once per (source grid, target grid, device,
    dtype) in eager mode. Inside ``torch.compile`` it is built in the graph instead (a few
    small kernels from ``arange``): a cached tensor read while tracing would be a global
    the graph guards on, and a cache filled while tracing would not survive the trace."""
    if _compiling():
        return bicubic_matrix_2d(src, dst, device, dtype)
    key = (tuple(src), tuple(dst), torch.device(device), dtype)
    m = _RESIZE_CACHE.get(key)
    if m is None:
        # A plain tensor even when first asked for under inference_mode, so a later
        # training step can save it for backward.
        with torch.inference_mode(False), torch.no_grad():
            m = bicubic_matrix_2d(src, dst, device, dtype)
        _RESIZE_CACHE[key] = m
    return m


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


class ConvStem(nn.Module):
    """Early convolutions in place of the patch embedding (Xiao et al. 2021, "Early
    Convolutions Help Transformers See Better", arXiv:2106.14881): ``log2(p)`` 3x3
    convolutions of stride 2, each followed by a norm and a non-linearity, then a 1x1
    convolution to D. It gives the same ``H/p x W/p`` grid of tokens as the patch
    embedding, but each token sees past its patch's borders and is a non-linear function
    of its pixels rather than a linear one.

    Channels double at each convolution and end at D/2. The norm is a layer norm over the
    channels at each position, where the paper uses batch norm: the teacher runs in eval
    mode and the k-NN reads one image at a time, so a token must not depend on the other
    images of its batch; GELU follows it, as in the blocks."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        n = patch.bit_length() - 1  # stride-2 convolutions: patch = 2 ** n
        widths = [max(8, dim >> (n - i)) for i in range(n)]  # ..., D/4, D/2
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c = in_chans
        for w in widths:
            self.convs.append(nn.Conv2d(c, w, kernel_size=3, stride=2, padding=1, bias=False))
            self.norms.append(nn.LayerNorm(w, eps=1e-6))
            c = w
        self.proj = nn.Conv2d(c, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)  # (B, C, H', W')
            x = F.gelu(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.proj(x)  # (B, D, H/p, W/p)


class ViT(nn.Module):
    """Backbone: images ``(B, C, H, W)`` -> CLS feature after the final norm ``(B, D)``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.in_chans, cfg.dim, p)
        else:
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        # Zeros, as iBOT's: no draw from the random stream, so the other weights are the
        # same with or without it.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid**2, cfg.dim))
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_dim, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=self.cfg.pos_embed_std)
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
        pe = self.pos_embed
        m = pos_resize_matrix((g, g), (grid_h, grid_w), pe.device, pe.dtype)
        # float32 as F.interpolate computed it: autocast would round the table to bf16.
        with torch.autocast(pe.device.type, enabled=False):
            patch_pos = m @ pe[0, 1:]  # (gh*gw, g*g) @ (g*g, D)
        return torch.cat([pe[:, :1], patch_pos[None]], dim=1)

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with CLS prepended and positions added: ``(B, 1 + N, D)``. Where
        ``mask`` ``(B, N)`` is true, the patch's embedding is replaced by the mask token
        before its position is added (iBOT), so the network knows where a hidden patch
        lies but not what it holds."""
        p = self.cfg.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"crop {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {p}")
        x = self.patch_embed(x)  # (B, D, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this ViT has no mask token: build it with "
                                 "ViTConfig(mask_token=True)")
            if mask.shape != x.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match the "
                                 f"{tuple(x.shape[:2])} patches of the crops")
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed_for(gh, gw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x[:, 0])

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Every token after the final norm, ``(B, 1 + N, D)``: the CLS feature first (the
        same as :meth:`forward`'s), then the patch tokens; ``mask`` as :meth:`tokens`."""
        x = self.tokens(x, mask)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

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


