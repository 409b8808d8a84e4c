"""Multi-crop augmentation (DINO, Sec. 3.1) batched on the device.

Input: a ``uint8`` batch ``(B, C, H, W)`` on any device. Every random parameter is drawn
per sample from one ``torch.Generator`` in a handful of tensor calls: no Python loop over
images, no host-device synchronisation, so the whole augmentation is a few dozen kernel
launches per step and overlaps with the model on the GPU.

Geometry (random resized crop and horizontal flip) is one affine map per crop, applied by
``grid_sample``; all crops of one size are sampled in a single call by laying their
sampling grids side by side, so the source batch is never copied per crop. Local crops cut
from a global crop (the seed's variant) compose the two affine maps and sample the source
image once, which keeps them as sharp as crops cut from the image.

With ``antialias`` a crop that shrinks its source is sampled k times finer on each side and
averaged over k x k blocks (a box filter over each output pixel's footprint), as PIL's
resize low-passes before it subsamples; without it, bilinear sampling of a shrunk crop
aliases. k comes from the recipe's largest crop, so it is a Python int and costs no sync.

Three options for digits, where colour jitter does nothing: ``rotation`` turns each crop's
sampling grid by a random angle about its centre (folded into the crop's affine map, so
it costs nothing); ``elastic`` bends the sampling grid by a smooth random displacement
field, as handwriting varies a digit's strokes (Simard et al. 2003); and ``stroke_p``
moves a crop part of the way to its grey dilation or erosion, changing the width of its
strokes. Each leaves the random draws of a recipe without it unchanged.

Colour (3-channel data only): brightness, contrast, saturation and hue jitter, in that fixed
order or (``jitter_order="random"``) in an order drawn per image, as torchvision's
``ColorJitter`` draws one per call; greyscale; then Gaussian blur, solarisation of the
second global view, and per-channel normalisation. Blur widths are given for a 224-px crop
(as in the DINO paper) and scaled to the crop side, so a 32-px crop is blurred as little,
relative to its size, as a 224-px one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Recipe

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as PIL's "L" conversion
_SOLARIZE_THRESHOLD = 128 / 255  # PIL's default threshold, in [0, 1] units


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int  # side of a global crop (pixels)
    local_size: int  # side of a local crop (pixels)
    mean: tuple[float, ...]  # per-channel mean of the data in [0, 1] units
    std: tuple[float, ...]  # per-channel standard deviation
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of a crop (w / h)
    local_from_global: bool = False
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_order: str = "fixed"
    antialias: bool = False
    rotation: float = 0.0  # degrees
    elastic: float = 0.0  # largest displacement, as a fraction of the crop's side
    elastic_points: int = 5  # control points per side of the elastic field
    stroke_p: float = 0.0
    grey_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2

    @classmethod
    def from_recipe(cls, recipe: Recipe, global_size: int, patch_size: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> MultiCropConfig:
        if recipe.flip_p is None or recipe.solarize_p is None:
            raise ValueError("the recipe's flip or solarisation is 'auto'; decide it for the "
                             "dataset with Recipe.for_dataset first")
        # A local crop keeps the patch size, so its side is a whole number of patches.
        local_patches = max(1, round(global_size * recipe.local_size_ratio / patch_size))
        return cls(
            global_size=global_size, local_size=local_patches * patch_size,
            mean=tuple(mean), std=tuple(std), n_global=recipe.n_global,
            n_local=recipe.n_local, global_scale=recipe.global_scale,
            local_scale=recipe.local_scale, local_from_global=recipe.local_from_global,
            flip_p=recipe.flip_p, jitter_p=recipe.jitter_p, jitter=recipe.jitter,
            jitter_order=recipe.jitter_order, antialias=recipe.antialias,
            rotation=recipe.rotation, elastic=recipe.elastic,
            elastic_points=recipe.elastic_points, stroke_p=recipe.stroke_p,
            grey_p=recipe.grey_p, blur_p=recipe.blur_p, blur_sigma=recipe.blur_sigma,
            solarize_p=recipe.solarize_p,
        )


def _rand(gen: torch.Generator | None, device, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=device)


def sample_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float],
                 gen: torch.Generator | None, device, tries: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes as fractions of a square image: ``(n, 4)`` holding
    width, height, left, top.

    As torchvision: area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio``; the first of ``tries`` draws that fits inside the image is kept, and the
    whole image is used when none fits. All tries are drawn at once (no data-dependent
    control flow).
    """
    area = scale[0] + (scale[1] - scale[0]) * _rand(gen, device, n, tries)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(
        gen, device, n, tries)
    aspect = log_r.exp()
    w = (area * aspect).sqrt()
    h = (area / aspect).sqrt()
    fits = (w <= 1.0) & (h <= 1.0)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try
    any_fit = fits.any(dim=1)
    one = torch.ones((), device=device)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), one)
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), one)
    pos = _rand(gen, device, n, 2)
    left = pos[:, 0] * (1.0 - w)
    top = pos[:, 1] * (1.0 - h)
    return torch.stack([w, h, left, top], dim=1)


def boxes_to_affine(boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``(n, 4)`` boxes and ``(n,)`` flip flags -> ``(n, 3, 3)`` affine maps from output
    to input coordinates in ``grid_sample``'s normalised [-1, 1] units."""
    w, h, left, top = boxes.unbind(1)
    theta = torch.zeros(boxes.shape[0], 3, 3, device=boxes.device, dtype=boxes.dtype)
    theta[:, 0, 0] = torch.where(flip, -w, w)  # a flip mirrors the x axis of the crop
    theta[:, 0, 2] = 2 * left + w - 1  # crop centre
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    theta[:, 2, 2] = 1
    return theta


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """``(n,)`` angles in radians -> ``(n, 3, 3)`` rotations of ``grid_sample``'s
    normalised coordinates about the origin, the centre of a crop. Applied before a crop's
    box map (``box @ rotation``), the crop's content turns by -angle on screen
    (counter-clockwise for a positive angle, with y pointing down)."""
    c, s = angles.cos(), angles.sin()
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=1).view(-1, 3, 3)


def random_rotations(n: int, degrees: float, gen: torch.Generator | None,
                     device) -> torch.Tensor:
    """``(n, 3, 3)`` rotations by angles uniform in ``[-degrees, degrees]``."""
    angles = (2 * _rand(gen, device, n) - 1) * math.radians(degrees)
    return rotations(angles)


# Control points per side of an elastic displacement field by default: neighbouring
# points are a quarter of the crop apart, about the length over which a pen stroke bends.
ELASTIC_CONTROL_POINTS = 5


def random_displacements(n: int, strength: float, gen: torch.Generator | None,
                         device, points: int = ELASTIC_CONTROL_POINTS) -> torch.Tensor:
    """``(n, 2, c, c)`` elastic displacement fields at ``c = points`` control points per
    side, x then y, each uniform in ``+-strength`` of a crop's side. In ``grid_sample``'s
    normalised units a side spans 2, so the draws are scaled by 2."""
    c = points
    return (2 * _rand(gen, device, n, 2, c, c) - 1) * (2 * strength)


def displacement_grid(control: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 2, c, c)`` control displacements -> ``(N, size, size, 2)`` at each output
    pixel, interpolated bilinearly with the corner control points on the corner pixels,
    so no displacement is larger than the largest control point's."""
    return F.interpolate(control, size=(size, size), mode="bilinear",
                         align_corners=True).permute(0, 2, 3, 1)


def change_stroke(x: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """With probability ``p`` per image of ``x (N, C, H, W)``, move it a uniform fraction
    of the way to its 3x3 grey dilation (the max over each pixel's neighbourhood: strokes
    brighter than the background grow) or, equally likely, its erosion (the min: they
    thin). A fraction below 1 changes a stroke's width by less than a pixel a side."""
    N, dev = x.shape[0], x.device
    u = _rand(gen, dev, 3, N)
    amount = torch.where(u[0] < p, u[2], torch.zeros_like(u[2])).view(N, 1, 1, 1)
    grown = F.max_pool2d(x, 3, stride=1, padding=1)
    thinned = -F.max_pool2d(-x, 3, stride=1, padding=1)
    target = torch.where((u[1] < 0.5).view(N, 1, 1, 1), grown, thinned)
    return x + amount * (target - x)


def supersampling(source_side: int, size: int, scale: tuple[float, float],
                  ratio: tuple[float, float]) -> int:
    """k for :func:`resample`: the largest factor by which a crop of ``scale`` and
    ``ratio`` (or the whole image, the fallback of :func:`sample_boxes`) can shrink a
    ``source_side``-px image into ``size`` px, rounded up. A crop cut from a global view
    is no wider than the same crop cut from the image, so the bound holds for it too."""
    widest = min(1.0, math.sqrt(scale[1] * max(ratio[1], 1 / ratio[0])))
    return max(1, math.ceil(source_side * widest / size - 1e-9))


def resample(images: torch.Tensor, theta: torch.Tensor, size: int,
             supersample: int = 1, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``n`` crops of every image: ``images (B, C, H, W)``, ``theta (n, B, 3, 3)``
    -> ``(n, B, C, size, size)``. One ``grid_sample`` call for all n crops.

    ``supersample`` k > 1 samples each crop at ``k * size`` and averages k x k blocks.
    ``displacement (n, B, 2, c, c)`` (:func:`random_displacements`) moves each sample
    point in the crop's own normalised coordinates before its affine map: the crop
    bends, whatever its box, flip or turn."""
    if supersample > 1:
        n, B, k = theta.shape[0], theta.shape[1], supersample
        fine = resample(images, theta, k * size,
                        displacement=displacement)  # (n, B, C, k S, k S)
        C = fine.shape[2]
        return F.avg_pool2d(fine.reshape(n * B, C, k * size, k * size), k).view(
            n, B, C, size, size)
    n, B = theta.shape[:2]
    affine = theta[..., :2, :].reshape(n * B, 2, 3)
    grid = F.affine_grid(affine, [n * B, 1, size, size], align_corners=False)  # (n*B, S, S, 2)
    if displacement is not None:
        # The map is linear plus a shift, so a point moved by d in the crop lands A d
        # further in the image: only the displacement goes through the linear part.
        d = displacement_grid(displacement.reshape(n * B, *displacement.shape[2:]), size)
        grid = grid + d @ affine[:, :, :2].transpose(1, 2).unsqueeze(1)
    # Lay the n grids of an image side by side: (B, S, n*S, 2).
    grid = grid.view(n, B, size, size, 2).permute(1, 2, 0, 3, 4).reshape(B, size, n * size, 2)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (B, C, S, n*S)
    return out.view(B, images.shape[1], size, n, size).permute(3, 0, 1, 2, 4)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB batch ``(N, 3, H, W)`` -> ``(N, 1, H, W)``."""
    # Python-scalar weights: a weight tensor built here would be a blocking host-to-device
    # copy on CUDA, several times per step.
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of an RGB batch ``(N, 3, H, W)`` in [0, 1] by ``shift (N,)``
    turns, keeping value (max) and chroma (max - min)."""
    r, g, b = x.unbind(1)
    v = x.amax(dim=1)
    chroma = v - x.amin(dim=1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # Hue in sixths of a turn, from whichever channel is the maximum.
    h6 = torch.where(v == r, ((g - b) / safe) % 6,
                     torch.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h6 = (h6 + 6 * shift.view(-1, 1, 1)) % 6
    # Rebuild each channel from (hue, value, chroma): channel n sits at offset n on the
    # hue circle (red 5, green 3, blue 1).
    out = []
    for offset in (5.0, 3.0, 1.0):
        k = (offset + h6) % 6
        out.append(v - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


def colour_jitter(x: torch.Tensor, strength: tuple[float, float, float, float], p: float,
                  gen: torch.Generator | None, random_order: bool = False) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with per-sample factors; applied to each
    sample with probability ``p`` (otherwise the factors are the identity). In that order,
    or with ``random_order`` in a permutation drawn per sample."""
    N, dev = x.shape[0], x.device
    apply = _rand(gen, dev, N) < p
    u = _rand(gen, dev, 4, N)

    def factor(i: int, s: float) -> torch.Tensor:
        lo = max(0.0, 1.0 - s)
        f = lo + (1.0 + s - lo) * u[i]
        return torch.where(apply, f, torch.ones_like(f)).view(N, 1, 1, 1)

    fb, fc, fs = factor(0, strength[0]), factor(1, strength[1]), factor(2, strength[2])
    hue = torch.where(apply, (2 * u[3] - 1) * strength[3], torch.zeros_like(u[3]))
    ops = (
        lambda y: (y * fb).clamp(0, 1),  # brightness
        lambda y: (fc * y + (1 - fc) * grey(y).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1),
        lambda y: (fs * y + (1 - fs) * grey(y)).clamp(0, 1),  # saturation
        lambda y: shift_hue(y, hue),
    )
    if not random_order:
        for op in ops:
            x = op(x)
        return x
    # perm[i, k]: the operation sample i gets k-th. Every operation runs on the whole
    # batch at every position and each sample keeps its own: 4x the arithmetic of the
    # fixed order, no data-dependent shapes.
    perm = _rand(gen, dev, N, 4).argsort(dim=1)
    for k in range(4):
        x_in = x
        for j, op in enumerate(ops):
            x = torch.where((perm[:, k] == j).view(N, 1, 1, 1), op(x_in), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma (N,)`` in pixels and a kernel of
    ``2 * radius + 1`` taps (a Python int, so shapes never depend on data); reflect
    padding. One grouped convolution per axis for the whole batch."""
    N, C, H, W = x.shape
    radius = max(1, min(radius, H - 1, W - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, k)
    kernel = kernel.repeat_interleave(C, dim=0)  # (N*C, k): one kernel per channel plane
    y = x.reshape(1, N * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"),
                 kernel.view(N * C, 1, 1, -1), groups=N * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"),
                 kernel.view(N * C, 1, -1, 1), groups=N * C)
    return y.view(N, C, H, W)


class MultiCrop:
    """``MultiCrop(cfg)(images_uint8, generator)`` -> ``[global_crops, local_crops]``.

    ``global_crops`` is ``(n_global * B, C, S, S)`` and ``local_crops``
    ``(n_local * B, C, s, s)``, both crop-major (crop 0 of every image, then crop 1, ...)
    as :func:`dino_loss` expects; normalised float32. With ``n_local = 0`` the list holds
    the global crops only.
    """

    def __init__(self, cfg: MultiCropConfig):
        self.cfg = cfg
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        cfg = self.cfg
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 batch (B, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[1] != len(cfg.mean):
            raise ValueError(f"images have {images.shape[1]} channels, normalisation has "
                             f"{len(cfg.mean)}")
        B, dev = images.shape[0], images.device
        src = images.float() / 255.0
        gen = generator

        # Global views: (n_global, B, 3, 3) affine maps from crop to image.
        g_box = sample_boxes(cfg.n_global * B, cfg.global_scale, cfg.ratio, gen, dev)
        g_flip = _rand(gen, dev, cfg.n_global * B) < cfg.flip_p
        g_theta = boxes_to_affine(g_box, g_flip)
        if cfg.rotation:
            g_theta = g_theta @ random_rotations(cfg.n_global * B, cfg.rotation, gen, dev)
        g_theta = g_theta.view(cfg.n_global, B, 3, 3)
        g_disp = self._displacements(cfg.n_global, B, gen, dev)
        side = max(images.shape[-2:])
        k_global = supersampling(side, cfg.global_size, cfg.global_scale, cfg.ratio) \
            if cfg.antialias else 1
        crops = [self._finish(resample(src, g_theta, cfg.global_size, k_global, g_disp),
                              gen, is_global=True)]

        if cfg.n_local:
            l_box = sample_boxes(cfg.n_local * B, cfg.local_scale, cfg.ratio, gen, dev)
            l_flip = _rand(gen, dev, cfg.n_local * B) < cfg.flip_p
            l_theta = boxes_to_affine(l_box, l_flip)
            if cfg.rotation:
                l_theta = l_theta @ random_rotations(cfg.n_local * B, cfg.rotation, gen, dev)
            l_theta = l_theta.view(cfg.n_local, B, 3, 3)
            if cfg.local_from_global:
                # Local crop j is cut from global view j mod n_global (the seed pairs them).
                parent = g_theta[torch.arange(cfg.n_local, device=dev) % cfg.n_global]
                l_theta = parent @ l_theta
            l_disp = self._displacements(cfg.n_local, B, gen, dev)
            k_local = supersampling(side, cfg.local_size, cfg.local_scale, cfg.ratio) \
                if cfg.antialias else 1
            crops.append(self._finish(resample(src, l_theta, cfg.local_size, k_local, l_disp),
                                      gen, is_global=False))
        return crops

    def _displacements(self, n: int, B: int, gen, dev) -> torch.Tensor | None:
        """Elastic fields ``(n, B, 2, c, c)`` for n crops of each image, or None (and no
        draws) without ``elastic``."""
        if not self.cfg.elastic:
            return None
        fields = random_displacements(n * B, self.cfg.elastic, gen, dev,
                                      self.cfg.elastic_points)
        return fields.view(n, B, *fields.shape[1:])

    def _finish(self, x: torch.Tensor, gen, is_global: bool) -> torch.Tensor:
        """Colour, blur, solarisation and normalisation of ``(n, B, C, S, S)`` crops."""
        cfg = self.cfg
        n, B, C, S, _ = x.shape
        dev = x.device
        x = x.reshape(n * B, C, S, S)
        N = n * B
        if cfg.stroke_p > 0:
            x = change_stroke(x, cfg.stroke_p, gen)
        if C == 3:
            x = colour_jitter(x, cfg.jitter, cfg.jitter_p, gen,
                              random_order=cfg.jitter_order == "random")
            to_grey = (_rand(gen, dev, N) < cfg.grey_p).view(N, 1, 1, 1)
            x = torch.where(to_grey, grey(x).expand_as(x), x)

        # Per-view probabilities: global view 0 and the other global views differ.
        view = torch.arange(n, device=dev).repeat_interleave(B)
        if is_global:
            blur_p = torch.where(view == 0, cfg.blur_p[0], cfg.blur_p[1])
        else:
            blur_p = torch.full((N,), cfg.blur_p[2], device=dev)
        scale = S / 224  # blur widths are specified for a 224-px crop
        lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
        sigma = lo + (hi - lo) * _rand(gen, dev, N)
        do_blur = (_rand(gen, dev, N) < blur_p).view(N, 1, 1, 1)
        x = torch.where(do_blur, gaussian_blur(x, sigma, math.ceil(3 * hi)), x)

        if is_global and cfg.solarize_p > 0:
            solar = ((_rand(gen, dev, N) < cfg.solarize_p) & (view >= 1)).view(N, 1, 1, 1)
            x = torch.where(solar & (x >= _SOLARIZE_THRESHOLD), 1.0 - x, x)

        mean, std = self._normalisation(dev)
        return (x - mean) / std

    def _normalisation(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std ``(1, C, 1, 1)`` on ``dev``, built once per device: a
        tensor built from a Python list is a blocking host-to-device copy on CUDA."""
        if dev not in self._norm:
            self._norm[dev] = tuple(torch.tensor(v, device=dev).view(1, -1, 1, 1)
                                    for v in (self.cfg.mean, self.cfg.std))
        return self._norm[dev]
