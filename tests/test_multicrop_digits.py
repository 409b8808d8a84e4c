"""The multi-crop's three options for digits: crops turned by a random angle
(``rotation``), bent by a smooth random displacement field (``elastic``), and strokes made
wider or thinner (``stroke_p``).

Rotation is checked against ``torch.rot90`` and against a round blob, which no rotation changes;
the elastic field against a translated crop (a constant field) and against bilinear
interpolation of its control points written out in float64 on a ramp image; the stroke
change against a float64 maximum and minimum over each pixel's neighbourhood written out
with loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.multicrop import (
    ELASTIC_CONTROL_POINTS,
    MultiCrop,
    MultiCropConfig,
    boxes_to_affine,
    change_stroke,
    displacement_grid,
    random_displacements,
    random_rotations,
    resample,
    rotations,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_quarter_turn_of_the_sampling_grid_is_rot90():
    """A whole-image crop turned by +90 degrees lands every sample on a pixel centre: it
    must equal torch.rot90 (counter-clockwise on screen), exactly up to float rounding."""
    img = torch.rand(2, 3, 8, 8)
    theta = rotations(torch.full((2,), math.pi / 2)).view(1, 2, 3, 3)
    out = resample(img, theta, 8)[0]
    torch.testing.assert_close(out, torch.rot90(img, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    # and the other way round for -90 degrees
    theta = rotations(torch.full((2,), -math.pi / 2)).view(1, 2, 3, 3)
    torch.testing.assert_close(resample(img, theta, 8)[0], torch.rot90(img, -1, dims=(-2, -1)),
                               atol=1e-5, rtol=0)


def test_random_rotations_are_rotations_within_the_range():
    R = random_rotations(4000, 20.0, gen(1), "cpu").double()
    eye = torch.eye(2, dtype=torch.float64).expand(4000, 2, 2)
    torch.testing.assert_close(R[:, :2, :2] @ R[:, :2, :2].transpose(1, 2), eye)
    assert torch.equal(R[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(4000, 3))
    assert torch.equal(R[:, :2, 2], torch.zeros(4000, 2, dtype=torch.float64))
    angle = torch.rad2deg(torch.atan2(R[:, 1, 0], R[:, 0, 0]))
    assert angle.abs().max() <= 20.0 + 1e-4
    assert angle.min() < -19.0 and angle.max() > 19.0  # the whole range is drawn
    assert abs(angle.mean()) < 1.0  # and symmetrically


def _multicrop(**kw) -> MultiCrop:
    cfg = dict(global_size=32, local_size=16, mean=(0.0,), std=(1.0,), n_global=2,
               n_local=2, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), flip_p=0.0,
               blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    cfg.update(kw)
    return MultiCrop(MultiCropConfig(**cfg))


def _blob(side=32, sigma=5.0):
    """A centred Gaussian blob, smooth enough that bilinear resampling of it is nearly
    exact: what a turn about the centre keeps."""
    c = (side - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(side) - c, torch.arange(side) - c, indexing="ij")
    ink = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    return (255 * ink).round().to(torch.uint8).view(1, 1, side, side)


def test_rotation_keeps_a_blob_and_turns_a_bar():
    """Whole-image crops (scale 1): with rotation a centred blob comes back as it was,
    while a horizontal bar does not."""
    blob = _blob().expand(16, 1, 32, 32).contiguous()
    plain = _multicrop()(blob, gen(0))[0]
    turned = _multicrop(rotation=45.0)(blob, gen(0))[0]
    assert (turned - plain).abs().max() < 0.03  # bilinear interpolation error only

    bar = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    bar[:, :, 14:18, 2:30] = 255
    plain = _multicrop()(bar, gen(0))[0]
    turned = _multicrop(rotation=45.0)(bar, gen(0))[0]
    moved = (turned - plain).abs().flatten(1).amax(1)
    assert (moved > 0.5).float().mean() > 0.8  # nearly every crop turned visibly


def _translation(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """``(n, 3, 3)`` maps p -> p + (dx, dy) of normalised crop coordinates."""
    T = torch.eye(3).repeat(dx.shape[0], 1, 1)
    T[:, 0, 2], T[:, 1, 2] = dx, dy
    return T


def test_a_constant_displacement_field_is_a_translated_crop():
    """Every control point moved by the same (dx, dy) moves every sample point by it, in
    the crop's own coordinates: the crop must equal the one whose affine map is preceded
    by that translation, for any box, flip and turn."""
    n, B = 2, 5
    img = torch.rand(B, 3, 20, 20, generator=gen(0))
    boxes = torch.tensor([[0.6, 0.5, 0.1, 0.3], [0.9, 0.8, 0.05, 0.1], [0.5, 0.5, 0.2, 0.2],
                          [0.7, 0.9, 0.3, 0.0], [1.0, 1.0, 0.0, 0.0]] * n)
    flip = torch.tensor([True, False, False, True, False] * n)
    theta = boxes_to_affine(boxes, flip) @ rotations(torch.linspace(-0.5, 0.5, n * B))
    d = (torch.rand(n * B, 2, generator=gen(1)) - 0.5) * 0.4
    field = d.view(n * B, 2, 1, 1).expand(n * B, 2, ELASTIC_CONTROL_POINTS,
                                          ELASTIC_CONTROL_POINTS)
    bent = resample(img, theta.view(n, B, 3, 3), 12, displacement=field.reshape(
        n, B, 2, ELASTIC_CONTROL_POINTS, ELASTIC_CONTROL_POINTS))
    moved = resample(img, (theta @ _translation(d[:, 0], d[:, 1])).view(n, B, 3, 3), 12)
    torch.testing.assert_close(bent, moved, atol=1e-5, rtol=0)
    assert (bent - resample(img, theta.view(n, B, 3, 3), 12)).abs().max() > 0.1


def _bilinear_by_hand(control: torch.Tensor, size: int) -> torch.Tensor:
    """float64 bilinear interpolation of a ``(c, c)`` grid to ``(size, size)``, the corner
    points on the corner pixels, by loops."""
    c = control.shape[0]
    out = torch.empty(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            y, x = i * (c - 1) / (size - 1), j * (c - 1) / (size - 1)
            y0, x0 = min(int(y), c - 2), min(int(x), c - 2)
            fy, fx = y - y0, x - x0
            q = control.double()
            out[i, j] = ((1 - fy) * (1 - fx) * q[y0, x0] + (1 - fy) * fx * q[y0, x0 + 1]
                         + fy * (1 - fx) * q[y0 + 1, x0] + fy * fx * q[y0 + 1, x0 + 1])
    return out


@pytest.mark.parametrize("points", [ELASTIC_CONTROL_POINTS, 3])
def test_displacement_on_a_ramp_is_the_interpolated_field(points):
    """On an image whose value is its column (a ramp), a whole-image crop samples its own
    x position: with the field on, each output pixel reads its column plus the field's x
    displacement in pixels (half the side per normalised unit). Pixels whose displaced
    sample stays inside the image are compared with a hand-written float64 bilinear
    interpolation of the control points; the y field leaves a ramp in x alone."""
    S = 16
    ramp = torch.arange(S, dtype=torch.float32).expand(1, 1, S, S).contiguous()
    theta = torch.eye(3).view(1, 1, 3, 3)
    field = random_displacements(1, 0.05, gen(2), "cpu", points).view(1, 1, 2, points, points)
    out = resample(ramp, theta, S, displacement=field)[0, 0, 0].double()
    expected = torch.arange(S, dtype=torch.float64) + _bilinear_by_hand(field[0, 0, 0], S) * S / 2
    inside = (expected >= 0) & (expected <= S - 1)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(out[inside], expected[inside], atol=1e-4, rtol=0)


def test_random_displacements_fill_their_range():
    d = random_displacements(2000, 0.1, gen(3), "cpu")
    assert d.shape == (2000, 2, ELASTIC_CONTROL_POINTS, ELASTIC_CONTROL_POINTS)
    assert d.abs().max() <= 0.2  # 0.1 of a side spanning 2 normalised units
    assert d.min() < -0.19 and d.max() > 0.19 and abs(d.mean()) < 0.005


def _folds(strength: float, points: int, n: int = 500, size: int = 17) -> float:
    """Fraction of ``n`` fields whose x map, as :func:`resample` builds it (each sample's
    x in the crop plus its x displacement), runs backwards somewhere along a row: a fold,
    where the crop shows part of the digit mirrored. At 17 px and 5 points the control
    points sit on every fourth sample row and column, so no fold falls between samples."""
    d = displacement_grid(random_displacements(n, strength, gen(5), "cpu", points), size)
    eye = torch.eye(2, 3).expand(n, 2, 3)
    x = F.affine_grid(eye, [n, 1, size, size], align_corners=False)[..., 0] + d[..., 0]
    return ((x[:, :, 1:] - x[:, :, :-1]) < 0).flatten(1).any(1).float().mean().item()


def test_fewer_control_points_fold_no_row():
    """At ``size`` samples the c control points of a row are s = 2 (1 - 1/size) / (c - 1)
    normalised units apart, and two neighbours can close by up to 2 x 2 x strength. A
    pair folds when it closes by more than s: for x draws uniform in +-a (a = 2 x
    strength) that has probability p = ((2a - s) / 2a)^2 / 2 (the difference of two
    uniforms is triangular). Neighbouring pairs of a row cannot both fold (the point
    they share would have to move both ways) and the others are independent, so at 5
    points a row folds with probability 4p - 3p^2, and one of 5 rows with
    1 - (1 - 4p + 3p^2)^5. At strength 0.2 and 17 px: p = 0.0848, 0.852 of the fields.
    At 3 points, or at strength 0.1, s exceeds the largest closing: no row folds."""
    a, s = 0.4, 2 * (1 - 1 / 17) / 4
    p = ((2 * a - s) / (2 * a)) ** 2 / 2
    assert abs(_folds(0.2, 5, n=2000) - (1 - (1 - 4 * p + 3 * p * p) ** 5)) < 0.03
    assert _folds(0.2, 3) == 0.0  # s = 0.94 > 0.8
    assert _folds(0.1, 5) == 0.0  # s = 0.47 > 0.4


def test_elastic_points_reach_the_crops():
    """The recipe's control points reach the multi-crop: the same draws bend a crop
    differently at 3 and at 5 points, and a recipe of 5 matches the default."""
    bar = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    bar[:, :, 14:18, 2:30] = 255
    five = _multicrop(elastic=0.2)(bar, gen(0))
    assert all(torch.equal(a, b) for a, b in
               zip(five, _multicrop(elastic=0.2, elastic_points=5)(bar, gen(0))))
    three = _multicrop(elastic=0.2, elastic_points=3)(bar, gen(0))
    assert all((a - b).abs().max() > 0.1 for a, b in zip(five, three))
    recipe = SMALL.replace(elastic=0.2, elastic_points=3).for_dataset(natural_images=False)
    assert MultiCropConfig.from_recipe(recipe, 16, 4, (0.0,), (1.0,)).elastic_points == 3


def test_elastic_option_bends_a_bar_and_keeps_a_flat_image():
    """Whole-image crops: with the option a bar moves in every crop, a flat image (which
    no displacement changes) stays as it was, and the draws before it are unchanged (the
    crops without it are the same with elastic 0)."""
    bar = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    bar[:, :, 14:18, 2:30] = 255
    plain = _multicrop()(bar, gen(0))
    assert all(torch.equal(a, b) for a, b in zip(plain, _multicrop(elastic=0.0)(bar, gen(0))))
    bent = _multicrop(elastic=0.1)(bar, gen(0))
    for p, b in zip(plain, bent):
        assert ((b - p).abs().flatten(1).amax(1) > 0.3).all()
    flat = torch.full((4, 1, 32, 32), 77, dtype=torch.uint8)
    bent = _multicrop(elastic=0.1, antialias=True)(flat, gen(0))
    for p, b in zip(_multicrop()(flat, gen(0)), bent):
        torch.testing.assert_close(b, p, atol=1e-6, rtol=0)


def _neighbourhood(x: torch.Tensor, reduce) -> torch.Tensor:
    """float64 max or min over each pixel's 3x3 neighbourhood inside the image, by loops."""
    N, C, H, W = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    out[n, c, i, j] = reduce(x[n, c, max(0, i - 1):i + 2, max(0, j - 1):j + 2]
                                             .double())
    return out


def test_change_stroke_against_float64_neighbourhoods():
    N = 24
    x = torch.rand(N, 1, 7, 7)
    y = change_stroke(x, p=1.0, gen=gen(3))
    u = torch.rand(3, N, generator=gen(3))  # the draws change_stroke makes: apply, grow, amount
    grow = (u[1] < 0.5).view(N, 1, 1, 1)
    target = torch.where(grow, _neighbourhood(x, torch.max), _neighbourhood(x, torch.min))
    expected = x.double() + u[2].double().view(N, 1, 1, 1) * (target - x.double())
    torch.testing.assert_close(y.double(), expected, atol=1e-6, rtol=0)
    assert grow.any() and not grow.all()  # both directions were drawn


def test_change_stroke_probability():
    x = torch.rand(4000, 1, 4, 4)
    assert torch.equal(change_stroke(x, 0.0, gen(0)), x)
    changed = (change_stroke(x, 0.3, gen(0)) != x).flatten(1).any(1).float().mean()
    assert abs(changed.item() - 0.3) < 0.03


def test_stroke_option_in_the_multicrop_grows_or_thins_each_crop():
    """Same geometry draws with and without the option (they come first), so each crop with
    it lies between the crop without it and that crop's dilation, or its erosion."""
    digit = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    digit[:, :, 6:26, 14:17] = 255  # a "1"
    base = _multicrop()(digit, gen(5))
    stroked = _multicrop(stroke_p=1.0)(digit, gen(5))
    directions = []
    for b, s in zip(base, stroked):
        grown = torch.nn.functional.max_pool2d(b, 3, stride=1, padding=1)
        thinned = -torch.nn.functional.max_pool2d(-b, 3, stride=1, padding=1)
        up = ((s >= b - 1e-6) & (s <= grown + 1e-6)).flatten(1).all(1)
        down = ((s <= b + 1e-6) & (s >= thinned - 1e-6)).flatten(1).all(1)
        assert (up | down).all()
        changed = (s - b).abs().flatten(1).amax(1) > 1e-3
        assert changed.float().mean() > 0.7  # amount is uniform: a few change very little
        directions.append((s.sum((1, 2, 3)) > b.sum((1, 2, 3))).float().mean())
    assert 0.0 < sum(directions) / len(directions) < 1.0  # some grew, some thinned


@pytest.mark.parametrize("field,value,words", [
    ("rotation", -1.0, "--rotation"), ("rotation", 181.0, "[0, 180]"),
    ("rotation", float("nan"), "--rotation"), ("stroke_p", 1.5, "--stroke-p"),
    ("elastic", -0.1, "--elastic"), ("elastic", 0.6, "[0, 0.5]"),
    ("elastic", float("inf"), "--elastic"), ("elastic_points", 1, "--elastic-points"),
    ("elastic_points", 2.5, "at least 2"),
])
def test_bad_values_are_refused(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SMALL.replace(**{field: value}).validate()


def test_resume_identity_leaves_them_out_only_at_their_defaults():
    assert "rotation" not in recipe_identity(SMALL)
    assert "stroke_p" not in recipe_identity(SMALL)
    assert "elastic" not in recipe_identity(SMALL)
    ident = recipe_identity(SMALL.replace(rotation=15.0, stroke_p=0.5, elastic=0.05))
    assert ident["rotation"] == 15.0 and ident["stroke_p"] == 0.5 and ident["elastic"] == 0.05
