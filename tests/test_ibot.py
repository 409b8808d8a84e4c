"""iBOT's masked-patch loss (``--ibot-weight``): the masks, the loss against a float64
loop, the mask token in the ViT, the trainer's gradient and patch center against a
recomputation on the same weights and crops, and the fields' checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dinobench.config import SMALL, ConfigError, recipe_identity
from dinobench.dino.ibot import ibot_loss, patch_masks
from dinobench.dino.loss import dino_loss
from dinobench.dino.model_setup import param_groups
from dinobench.run import vit_identity
from dinobench.vit import ViT
from helpers import tiny_trainer

# --- masks -----------------------------------------------------------------------------

def test_masks_hide_the_drawn_number_of_patches():
    gen = torch.Generator().manual_seed(0)
    m = patch_masks(4000, 16, (0.1, 0.5), 0.5, gen, "cpu")
    assert m.dtype == torch.bool and m.shape == (4000, 16)
    hidden = m.sum(1)
    masked = hidden > 0
    # round(0.1 * 16) = 2 to round(0.5 * 16) = 8 patches in a masked view
    assert hidden[masked].min() == 2 and hidden[masked].max() == 8
    assert set(hidden[masked].unique().tolist()) == set(range(2, 9))
    assert abs(masked.float().mean().item() - 0.5) < 0.03  # p_view 0.5, 4000 draws
    # Every position is equally likely: 16 counts of about 1/16 of the hidden patches.
    share = m.sum(0).float() / m.sum()
    assert (share - 1 / 16).abs().max() < 0.01


def test_masks_always_and_at_least_one():
    gen = torch.Generator().manual_seed(1)
    m = patch_masks(500, 4, (0.01, 0.02), 1.0, gen, "cpu")
    assert (m.sum(1) == 1).all()  # round(0.04) = 0 patches, raised to 1


def test_masks_follow_the_generator():
    a = patch_masks(64, 16, (0.1, 0.5), 0.5, torch.Generator().manual_seed(3), "cpu")
    b = patch_masks(64, 16, (0.1, 0.5), 0.5, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(a, b)


# --- the loss ----------------------------------------------------------------------------

def _ibot_float64(student, teacher, center, masks, student_temp, teacher_temp):
    """The loss written out with loops over views and patches, in float64: the mean
    over a view's hidden patches, then over every view (one that hides none adds 0)."""
    total, views = 0.0, masks.shape[0]
    for v in range(masks.shape[0]):
        hidden = [n for n in range(masks.shape[1]) if masks[v, n]]
        if not hidden:
            continue
        per_patch = []
        for n in hidden:
            t = (teacher[v, n].double() - center.double().reshape(-1)) / teacher_temp
            q = torch.exp(t - t.max())
            q = q / q.sum()
            s = student[v, n].double() / student_temp
            log_p = s - (s.max() + torch.log(torch.exp(s - s.max()).sum()))
            per_patch.append(-(q * log_p).sum())
        total = total + sum(per_patch) / len(per_patch)
    return torch.as_tensor(total / views, dtype=torch.float64)


def test_loss_against_float64_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 6, 7, generator=g), torch.randn(5, 6, 7, generator=g)
    center = torch.randn(1, 7, generator=g)
    masks = torch.rand(5, 6, generator=g) < 0.4
    masks[2] = False  # a view that hides nothing adds 0 to the mean
    masks[0, 0] = True
    got = ibot_loss(s, t, center, masks, student_temp=0.1, teacher_temp=0.04)
    want = _ibot_float64(s, t, center, masks, 0.1, 0.04)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_loss_hand_derived():
    """K = 2, a uniform teacher and a student at (0, tau_s log 3): p = (1/4, 3/4), so the
    loss is -(log(1/4) + log(3/4)) / 2 at the one hidden patch; the visible one, however
    far off, adds nothing; a second view that hides nothing halves the mean."""
    s = torch.tensor([[[0.0, 0.1 * math.log(3.0)], [50.0, -50.0]]])
    t = torch.zeros(1, 2, 2)
    masks = torch.tensor([[True, False]])
    got = ibot_loss(s, t, torch.zeros(1, 2), masks, student_temp=0.1, teacher_temp=0.04)
    one = -(math.log(0.25) + math.log(0.75)) / 2
    assert got.item() == pytest.approx(one, rel=1e-6)
    two = ibot_loss(s.repeat(2, 1, 1), t.repeat(2, 1, 1), torch.zeros(1, 2),
                    torch.tensor([[True, False], [False, False]]), student_temp=0.1,
                    teacher_temp=0.04)
    assert two.item() == pytest.approx(one / 2, rel=1e-6)


def test_loss_is_zero_when_nothing_is_hidden():
    s, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    got = ibot_loss(s, t, torch.zeros(1, 5), torch.zeros(3, 4, dtype=torch.bool),
                    student_temp=0.1, teacher_temp=0.04)
    assert got.item() == 0.0


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="masks"):
        ibot_loss(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.zeros(1, 5),
                  torch.zeros(3, 5, dtype=torch.bool), student_temp=0.1, teacher_temp=0.04)


# --- the mask token ----------------------------------------------------------------------

def test_hidden_patches_do_not_reach_the_output(tiny_vit_cfg):
    vit = ViT(dataclasses.replace(tiny_vit_cfg, mask_token=True)).eval()
    with torch.no_grad():
        vit.mask_token.normal_()
    x = torch.randn(2, 1, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True  # patch (1, 1): rows 4-7, columns 4-7
    changed_hidden, changed_visible = x.clone(), x.clone()
    changed_hidden[:, :, 4:8, 4:8] += 3.0
    changed_visible[:, :, 0:4, 8:12] += 3.0  # patch (0, 2), visible
    with torch.no_grad():
        base = vit.forward_tokens(x, mask)
        torch.testing.assert_close(vit.forward_tokens(changed_hidden, mask), base)
        assert not torch.allclose(vit.forward_tokens(changed_visible, mask), base)
        # Nothing hidden is the plain forward, whose CLS feature comes first.
        torch.testing.assert_close(vit.forward_tokens(x, torch.zeros_like(mask))[:, 0],
                                   vit(x))
        assert not torch.allclose(base[:, 0], vit(x))


def test_mask_token_is_optional_and_draws_nothing(tiny_vit_cfg):
    torch.manual_seed(0)
    plain = ViT(tiny_vit_cfg)
    torch.manual_seed(0)
    masked = ViT(dataclasses.replace(tiny_vit_cfg, mask_token=True))
    assert plain.mask_token is None and "mask_token" not in plain.state_dict()
    assert torch.count_nonzero(masked.mask_token) == 0
    state = masked.state_dict()
    del state["mask_token"]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="mask token"):
        plain.tokens(torch.randn(1, 1, 16, 16), torch.zeros(1, 16, dtype=torch.bool))
    assert "mask_token" not in vit_identity(tiny_vit_cfg)
    assert vit_identity(dataclasses.replace(tiny_vit_cfg, mask_token=True))["mask_token"]


def test_mask_token_has_no_weight_decay(tiny_vit_cfg):
    vit = ViT(dataclasses.replace(tiny_vit_cfg, mask_token=True))
    decay, no_decay = param_groups(vit)
    assert any(p is vit.mask_token for p in no_decay["params"])
    assert not any(p is vit.mask_token for p in decay["params"])


# --- in the trainer ------------------------------------------------------------------------

@pytest.fixture
def recipe(tiny_recipe):
    # No stochastic depth: the recomputation below must see the trainer's exact forward.
    return tiny_recipe.replace(drop_path=0.0)


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()}


def test_trainer_gradient_is_dino_plus_weighted_ibot(recipe, tiny_vit_cfg):
    """The student's gradient equals that of DINO's loss on the masked views' CLS plus
    0.5 x the float64 loop above on the patch logits, recomputed on a fresh trainer of
    the same initialisation; the mask token gets a gradient."""
    r = recipe.replace(ibot_weight=0.5)
    trainer = tiny_trainer(r, tiny_vit_cfg)
    crops = trainer.multicrop(_images(), torch.Generator().manual_seed(1))
    masks = patch_masks(crops[0].shape[0], 16, (0.1, 0.5), 0.5,
                        torch.Generator().manual_seed(2), "cpu")
    masks[0, 3] = True
    # Two different centers, so that one used in place of the other shows.
    g = torch.Generator().manual_seed(4)
    center, patch_center = torch.randn(1, r.out_dim, generator=g), torch.randn(
        1, r.out_dim, generator=g)
    trainer.center, trainer.patch_center = center.clone(), patch_center.clone()
    trainer._forward_backward(crops, 0.04, masks)
    got = _grads(trainer.student)

    fresh = tiny_trainer(r, tiny_vit_cfg)
    with torch.no_grad():
        t_out, _, t_patches = fresh.teacher(crops[:1], patches=True)
    s_out, _, s_patches = fresh.student(crops, return_features=True, patches=True, masks=masks)
    expected = dino_loss(s_out, t_out, center, student_temp=r.student_temp,
                         teacher_temp=0.04, n_global=r.n_global) + 0.5 * _ibot_float64(
        s_patches, t_patches, patch_center, masks, r.student_temp, 0.04)
    params = dict(fresh.student.named_parameters())
    want = torch.autograd.grad(expected, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), want):
        torch.testing.assert_close(got[name], torch.zeros_like(p) if g is None else g.float(),
                                   atol=1e-5, rtol=1e-3, msg=name)
    assert torch.count_nonzero(got["backbone.mask_token"]) > 0


def test_nothing_hidden_is_plain_dino(recipe, tiny_vit_cfg):
    """With no patch hidden the patch term is 0 and the CLS path is DINO's: the same
    gradient as the trainer without iBOT, on the same weights and crops."""
    with_ibot = tiny_trainer(recipe.replace(ibot_weight=1.0), tiny_vit_cfg)
    plain = tiny_trainer(recipe, tiny_vit_cfg)
    crops = plain.multicrop(_images(), torch.Generator().manual_seed(1))
    none = torch.zeros(crops[0].shape[0], 16, dtype=torch.bool)
    loss_ibot = with_ibot._forward_backward(crops, 0.04, none)[2]
    loss_plain = plain._forward_backward(crops, 0.04)[2]
    assert loss_ibot.item() == pytest.approx(loss_plain.item(), rel=1e-6)
    a, b = _grads(with_ibot.student), _grads(plain.student)
    for name, g in b.items():
        torch.testing.assert_close(a[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert torch.count_nonzero(a["backbone.mask_token"]) == 0


def test_patch_center_follows_the_teacher_patches(recipe, tiny_vit_cfg):
    """After one step the patch center is (1 - 0.9) x the mean of the teacher's patch
    logits on that step's global views (recomputed in float64), and it survives a
    checkpoint."""
    r = recipe.replace(ibot_weight=1.0, center_momentum=0.9)
    trainer = tiny_trainer(r, tiny_vit_cfg)
    images = _images()
    trainer.step(images, torch.Generator().manual_seed(1), lr=0.0, wd=0.0, momentum=1.0,
                 teacher_temp=0.04, freeze_last_layer=False)
    fresh = tiny_trainer(r, tiny_vit_cfg)
    crops = fresh.multicrop(images, torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_patches = fresh.teacher(crops[:1], patches=True)[2].double()
    want = 0.1 * t_patches.reshape(-1, r.out_dim).mean(0, keepdim=True)
    torch.testing.assert_close(trainer.patch_center.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(trainer.patch_center) > 0

    state = trainer.state_dict()
    restored = tiny_trainer(r, tiny_vit_cfg)
    restored.load_state_dict(state)
    assert torch.equal(restored.patch_center, trainer.patch_center)
    assert "patch_center" not in tiny_trainer(recipe, tiny_vit_cfg).state_dict()


# --- the fields --------------------------------------------------------------------------

@pytest.mark.parametrize("changes, flag", [
    ({"ibot_weight": -1.0}, "ibot-weight"),
    ({"ibot_weight": float("nan")}, "ibot-weight"),
    ({"ibot_mask_ratio": (0.0, 0.5)}, "ibot-mask-ratio"),
    ({"ibot_mask_ratio": (0.5, 0.3)}, "ibot-mask-ratio"),
    ({"ibot_mask_ratio": (0.1, 1.0)}, "ibot-mask-ratio"),
    ({"ibot_mask_ratio": (0.1, float("nan"))}, "ibot-mask-ratio"),
    ({"ibot_mask_p": 1.5}, "ibot-mask-p"),
    ({"ibot_weight": 1.0, "ibot_mask_p": 0.0}, "ibot-mask-p"),
])
def test_bad_fields_are_refused(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        SMALL.replace(**changes).validate()


def test_resume_identity_leaves_them_out_at_their_defaults():
    ident = recipe_identity(SMALL)
    assert not {"ibot_weight", "ibot_mask_ratio", "ibot_mask_p"} & set(ident)
    assert recipe_identity(SMALL.replace(ibot_weight=1.0))["ibot_weight"] == 1.0
