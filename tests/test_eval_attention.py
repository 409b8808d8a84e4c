"""attention_mask, jaccard and the foreground-overlap scores against brute force."""

import itertools
import math

import pytest
import torch

from dinobench import attention_mask, jaccard
from dinobench.eval.attention import (
    cls_attention_maps,
    expected_random_jaccard,
    overlap_scores,
    patch_foreground,
    uniform_overlap,
)
from dinobench.vit import ViT, ViTConfig


def smallest_set_brute_force(row: list[float], keep: float) -> set[int]:
    """The smallest subset holding >= keep of the mass, by enumerating every subset
    (unique when weights are distinct)."""
    total = sum(row)
    n = len(row)
    for size in range(1, n + 1):
        best = max(itertools.combinations(range(n), size),
                   key=lambda s: sum(row[i] for i in s))
        if sum(row[i] for i in best) / total >= keep:
            return set(best)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.6, 0.9, 1.0])
def test_mask_is_smallest_set_holding_the_mass(keep):
    gen = torch.Generator().manual_seed(1)
    rows = torch.rand(30, 7, generator=gen, dtype=torch.float64) ** 3  # skewed, distinct
    mask = attention_mask(rows, keep)
    assert mask.shape == rows.shape and mask.dtype == torch.bool
    for r, m in zip(rows.tolist(), mask):
        assert set(m.nonzero().squeeze(1).tolist()) == smallest_set_brute_force(r, keep)


def test_mask_hand_derived_boundary_holds_exactly_keep_mass():
    # Sorted ascending 1/8, 1/8, 1/4, 1/2; cumulative 1/8, 1/4, 1/2, 1: with keep 3/4 the
    # threshold is 1/4, so the patches of cumulative sum 1/2 and 1 (indices 0 and 2) stay.
    row = torch.tensor([0.25, 0.125, 0.5, 0.125])
    assert attention_mask(row, 0.75).tolist() == [True, False, True, False]
    # Unnormalised input gives the same mask: the rule normalises first.
    assert attention_mask(row * 37.0, 0.75).tolist() == [True, False, True, False]


def test_ties_keep_the_later_positions():
    # Five equal weights, keep half: cumulative 0.2 .. 1.0 > 0.5 keeps three patches, and
    # the stable ascending sort puts the later positions last.
    assert attention_mask(torch.ones(5), 0.5).tolist() == [False, False, True, True, True]
    # Uniform over 10 with keep 0.6 keeps 10 - floor(10 * 0.4) = 6 patches.
    assert attention_mask(torch.ones(10), 0.6).tolist() == [False] * 4 + [True] * 6


def test_mask_follows_a_permutation_of_distinct_weights():
    gen = torch.Generator().manual_seed(2)
    row = torch.rand(16, generator=gen)
    perm = torch.randperm(16, generator=gen)
    assert torch.equal(attention_mask(row[perm]), attention_mask(row)[perm])


def test_mask_covers_everything_or_the_support_or_one_patch():
    row = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert attention_mask(row, 1.0).all()
    with_zeros = torch.tensor([0.0, 0.5, 0.0, 0.5])
    assert attention_mask(with_zeros, 1.0).tolist() == [False, True, False, True]
    # A tiny keep_mass still keeps the largest weight: never an empty mask.
    assert attention_mask(row, 1e-9).tolist() == [False, False, False, True]


def test_mask_batched_rows_are_independent():
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 3, 12, generator=gen)
    mask = attention_mask(maps)
    for i, j in itertools.product(range(2), range(3)):
        assert torch.equal(mask[i, j], attention_mask(maps[i, j]))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 4), "all zero"),
    (torch.tensor([[0.5, -0.1, 0.6]]), "negative"),
    (torch.tensor([[0.5, math.nan, 0.5]]), "not finite"),
    (torch.tensor([[0.5, math.inf, 0.5]]), "not finite"),
])
def test_mask_rejects_rows_without_mass(bad, message):
    with pytest.raises(ValueError, match=message):
        attention_mask(bad)


def test_mask_rejects_bad_arguments():
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_mass"):
            attention_mask(torch.ones(4), keep)
    with pytest.raises(ValueError, match="floating"):
        attention_mask(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        attention_mask(torch.ones(3, 0))


def test_jaccard_matches_python_sets():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(5, 3, 9, generator=gen) < 0.4
    b = torch.rand(5, 3, 9, generator=gen) < 0.4
    got = jaccard(a, b)
    assert got.shape == (5, 3) and got.dtype == torch.float64
    for i, j in itertools.product(range(5), range(3)):
        sa = set(a[i, j].nonzero().squeeze(1).tolist())
        sb = set(b[i, j].nonzero().squeeze(1).tolist())
        expect = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
        assert got[i, j].item() == pytest.approx(expect, abs=1e-15)
    flat_a, flat_b = set(a.flatten().nonzero().squeeze(1).tolist()), \
        set(b.flatten().nonzero().squeeze(1).tolist())
    assert jaccard(a, b, dim=None).item() == pytest.approx(
        len(flat_a & flat_b) / len(flat_a | flat_b))
    per_image = jaccard(a, b, dim=(1, 2))
    assert per_image.shape == (5,)
    assert per_image[0].item() == pytest.approx(jaccard(a[0], b[0], dim=None).item())


def test_jaccard_empty_full_identical_disjoint():
    empty, full = torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
    half = torch.tensor([True, True, True, False, False, False])
    assert jaccard(empty, empty).item() == 1.0  # 0/0 is defined: identical sets
    assert jaccard(empty, full).item() == 0.0
    assert jaccard(full, full).item() == 1.0
    assert jaccard(half, ~half).item() == 0.0
    assert jaccard(half, full).item() == 0.5


def test_jaccard_rejects_non_boolean_or_mismatched():
    with pytest.raises(ValueError, match="boolean"):
        jaccard(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        jaccard(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_patch_foreground_half_rule():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :2] = True  # top-left 4x4 patch: 8 of 16 pixels -> foreground
    mask[0, 4:, 4:] = True  # bottom-right patch: all 16
    mask[0, :4, 4:] = torch.arange(16).view(4, 4) < 7  # top-right: 7 of 16 -> background
    assert patch_foreground(mask, 2).tolist() == [[[True, False], [False, True]]]


def test_patch_foreground_grid_that_does_not_divide_the_side():
    # 3 px split into 2 patches of 1.5 px: patch (0, 0) holds pixel (0, 0) whole, half of
    # (0, 1) and of (1, 0), a quarter of (1, 1): area 2.25. Pixels (0, 0) and (0, 1)
    # cover 1.5 of it (2/3: foreground); (0, 0) alone 1 (4/9: background).
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0, :2] = True
    assert patch_foreground(mask, 2).tolist() == [[[True, False], [False, False]]]
    mask[0, 0, 1] = False
    assert not patch_foreground(mask, 2).any()


@pytest.mark.parametrize("grid", [3, 5, 7])
def test_patch_foreground_against_supersampled_masks(grid):
    # Brute force: every pixel repeated grid x grid times tiles exactly into grid patches
    # of H x W sub-pixels each, whose mean is the covered share.
    masks = torch.rand(6, 32, 28, generator=torch.Generator().manual_seed(grid)) > 0.55
    up = masks.repeat_interleave(grid, 1).repeat_interleave(grid, 2).double()
    share = up.reshape(6, grid, 32, grid, 28).mean((2, 4))
    assert torch.equal(patch_foreground(masks, grid), share >= 0.5)
    assert torch.equal(patch_foreground(masks, grid, min_fraction=0.3), share >= 0.3)


def brute_force_scores(attn: torch.Tensor, fg: torch.Tensor, keep: float):
    """Per image: best and mean head Jaccard, mass inside, pointing hit, by loops."""
    out = []
    for maps, f in zip(attn.tolist(), fg.flatten(1).tolist()):
        fset = {i for i, v in enumerate(f) if v}
        jac, mass = [], []
        for head in maps:
            flat = [v for r in head for v in r]
            total = sum(flat)
            kept, acc = set(), 0.0
            for i in sorted(range(len(flat)), key=lambda i: -flat[i]):  # largest first
                if acc >= keep * total:
                    break
                kept.add(i)
                acc += flat[i]
            jac.append(len(kept & fset) / len(kept | fset))
            mass.append(sum(flat[i] for i in fset) / total)
        mean_map = [sum(v) / len(v) for v in zip(*[[v / sum(sum(r) for r in h) for r in h
                                                    for v in r] for h in maps])]
        hit = float(max(range(len(mean_map)), key=mean_map.__getitem__) in fset)
        out.append((max(jac), sum(jac) / len(jac), sum(mass) / len(mass), hit))
    return out


def test_overlap_scores_match_brute_force():
    gen = torch.Generator().manual_seed(5)
    attn = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64) ** 4
    fg = torch.rand(6, 4, 4, generator=gen) < 0.4
    fg[:, 0, 0] = True  # every image has a foreground patch
    s = overlap_scores(attn, fg)
    for i, (best, mean, mass, hit) in enumerate(brute_force_scores(attn, fg, 0.6)):
        assert s.jaccard_best_head[i].item() == pytest.approx(best)
        assert s.jaccard_mean_head[i].item() == pytest.approx(mean)
        assert s.mass_inside[i].item() == pytest.approx(mass)
        assert s.pointing_game[i].item() == hit
    summary = s.summary()
    assert summary["jaccard_best_head"] == pytest.approx(100 * s.jaccard_best_head.mean())
    assert summary["n_scored"] == summary["n_images"] == 6


def test_attention_on_the_foreground_scores_one_and_off_it_zero():
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[0, 1:3, 1:3] = True  # four foreground patches of 16
    # 0.65 of the mass shared by the foreground, 0.35 by the twelve other patches: the
    # 60% mask is exactly the foreground.
    on = torch.where(fg, 0.65 / 4, 0.35 / 12)[:, None].repeat(1, 2, 1, 1)
    s = overlap_scores(on, fg).summary()
    assert s["jaccard_best_head"] == pytest.approx(100.0)
    assert s["jaccard_mean_head"] == pytest.approx(100.0)
    assert s["mass_inside"] == pytest.approx(65.0)
    assert s["pointing_game"] == 100.0
    off = torch.where(fg, 0.0, 1 / 12)[:, None].repeat(1, 2, 1, 1)
    s = overlap_scores(off, fg).summary()
    assert s["jaccard_best_head"] == 0.0 and s["mass_inside"] == 0.0
    assert s["pointing_game"] == 0.0
    # All the mass on the foreground, keep everything: the mask is the foreground.
    only = torch.where(fg, 0.25, 0.0)[:, None]
    assert overlap_scores(only, fg, keep_mass=1.0).summary()["jaccard_best_head"] == 100.0


def test_images_without_foreground_patches_are_counted_not_scored():
    fg = torch.zeros(2, 2, 2, dtype=torch.bool)
    fg[0, 0, 0] = True
    attn = torch.tensor([[0.7, 0.1], [0.1, 0.1]]).expand(2, 1, 2, 2)
    s = overlap_scores(attn, fg).summary()
    assert (s["n_scored"], s["n_images"]) == (1, 2)
    assert s["jaccard_best_head"] == pytest.approx(100.0)  # 0.7 >= 0.6: one patch
    assert s["fg_area"] == pytest.approx(25.0)


def test_uniform_expected_jaccard_matches_enumeration():
    fg = torch.tensor([[[True, True, False], [False, True, False]]])  # 3 of 6 patches
    size = int(attention_mask(torch.ones(6), 0.6).sum())  # 6 - floor(2.4) = 4
    assert size == 4
    fset = {0, 1, 4}
    subsets = list(itertools.combinations(range(6), size))
    expect = sum(len(fset & set(s)) / len(fset | set(s)) for s in subsets) / len(subsets)
    u = uniform_overlap(fg).summary()
    assert u["jaccard_best_head"] == pytest.approx(100 * expect, abs=1e-12)
    assert u["jaccard_mean_head"] == u["jaccard_best_head"]
    assert u["mass_inside"] == u["pointing_game"] == u["fg_area"] == pytest.approx(50.0)
    assert expected_random_jaccard(5, 0, 0) == 1.0  # both empty
    assert expected_random_jaccard(5, 5, 5) == 1.0


def test_uniform_maps_score_the_area_fraction_through_overlap_scores():
    gen = torch.Generator().manual_seed(6)
    fg = torch.rand(5, 4, 4, generator=gen) < 0.3
    fg[:, 3, 3] = True
    s = overlap_scores(torch.full((5, 2, 4, 4), 1 / 16), fg).summary()
    u = uniform_overlap(fg).summary()
    assert s["mass_inside"] == pytest.approx(u["mass_inside"])
    assert s["pointing_game"] == pytest.approx(u["pointing_game"])  # ties: area share


def test_cls_attention_maps_batched_equal_one_pass():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, grid=4, in_chans=1, dim=16, depth=1, heads=2,
                        mlp_dim=32))
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    maps = cls_attention_maps(vit, images, (0.5,), (0.25,), batch_size=2)
    assert maps.shape == (5, 2, 4, 4)
    assert torch.allclose(maps.sum((-2, -1)), torch.ones(5, 2), atol=1e-5)
    x = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        assert torch.allclose(maps, vit.cls_attention(x), atol=1e-6)
