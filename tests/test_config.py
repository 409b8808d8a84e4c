"""The two recipes against DESIGN.md, and validation errors that name the flag."""

from __future__ import annotations

import dataclasses

import pytest

from dinobench.config import OFFICIAL, RECIPES, SEED, Recipe, get_recipe
from dinobench.dino.schedules import teacher_temp_schedule
from dinobench.errors import ConfigError, UserError


@pytest.mark.parametrize("name", ["seed", "official", "small"])
def test_presets_validate(name):
    assert RECIPES[name] is get_recipe(name)
    recipe = get_recipe(name).for_dataset(natural_images=True)
    assert recipe.validate() is recipe
    assert recipe.name == name


def test_seed_matches_design():
    """DESIGN.md, "What the seed did": linear head to K=10, student 0.9, teacher 0.05 with
    no warm-up, center momentum 0.9, teacher EMA from 0.996, 2 global crops of scale >=
    0.5 and 8 local crops of scale < 0.5 cut from the global crops; the 5.3M ViT."""
    r = SEED
    assert r.head == "seed" and r.out_dim == 10
    assert r.student_temp == 0.9
    assert r.teacher_temp == 0.05
    # The teacher temperature the trainer actually uses is 0.05 from the first epoch.
    assert list(teacher_temp_schedule(r.warmup_teacher_temp, r.teacher_temp,
                                      r.warmup_teacher_temp_epochs, 5)) == [0.05] * 5
    assert r.center_momentum == 0.9
    assert r.teacher_momentum == 0.996
    assert r.local_from_global is True
    assert r.global_scale == (0.5, 1.0)
    assert r.local_scale[1] <= 0.5
    assert (r.n_global, r.n_local) == (2, 8)
    assert (r.dim, r.depth, r.heads, r.mlp_dim) == (192, 12, 4, 768)


def test_official_matches_design():
    """DESIGN.md, "The official recipe": the DINO paper's values."""
    r = OFFICIAL
    assert r.head == "official"
    assert (r.head_hidden_dim, r.head_bottleneck_dim, r.out_dim) == (2048, 256, 4096)
    assert r.freeze_last_layer_epochs == 1
    assert r.student_temp == 0.1
    assert (r.warmup_teacher_temp, r.teacher_temp, r.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30)
    assert r.center_momentum == 0.9 and r.teacher_momentum == 0.996
    assert (r.lr, r.min_lr, r.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (r.weight_decay, r.weight_decay_end) == (0.04, 0.4)
    assert r.clip_grad == 3.0
    assert r.drop_path == 0.1
    assert r.global_scale == (0.4, 1.0) and r.local_scale == (0.05, 0.4)
    assert r.local_from_global is False
    assert r.jitter == (0.4, 0.4, 0.2, 0.1) and r.jitter_p == 0.8
    assert r.grey_p == 0.2 and r.blur_p == (1.0, 0.1, 0.5) and r.solarize_p == 0.2
    assert (r.n_global, r.n_local, r.n_crops) == (2, 8, 10)
    assert (r.dim, r.depth, r.heads, r.mlp_dim) == (192, 12, 4, 768)


def test_recipes_are_immutable_and_replace_copies():
    """Presets are frozen: replace() returns a new recipe and leaves the preset alone."""
    r = SEED.replace(student_temp=0.5)
    assert r.student_temp == 0.5 and SEED.student_temp == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEED.student_temp = 0.1  # type: ignore[misc]


def test_unknown_recipe_is_a_config_error():
    """An unknown preset is a ConfigError naming it and listing the valid names."""
    with pytest.raises(ConfigError, match=r"^unknown recipe 'dino'; choose one of: "
                                          r"seed, official, small$"):
        get_recipe("dino")


@pytest.mark.parametrize("changes,flag", [
    (dict(student_temp=-0.1), "--student-temp"),
    (dict(student_temp=0.0), "--student-temp"),
    (dict(teacher_temp=-0.05), "--teacher-temp"),
    (dict(warmup_teacher_temp=-0.04), "--warmup-teacher-temp"),
    (dict(student_temp=float("nan")), "--student-temp"),
    (dict(center_momentum=1.5), "--center-momentum"),
    (dict(center_momentum=-0.1), "--center-momentum"),
    (dict(teacher_momentum=1.01), "--teacher-momentum"),
    (dict(teacher_momentum=-0.5), "--teacher-momentum"),
    (dict(out_dim=1), "--out-dim"),
    (dict(global_scale=(0.9, 0.5)), "--global-scale"),
    (dict(local_scale=(0.4, 0.05)), "--local-scale"),
    (dict(local_scale=(0.0, 0.4)), "--local-scale"),
    (dict(global_scale=(0.5, 1.2)), "--global-scale"),
    (dict(lr=0.0), "--lr"),
    (dict(drop_path=1.5), "--drop-path"),
    (dict(solarize_p=2.0), "--solarize-p"),
    (dict(n_local=-1), "--n-local"),
    (dict(clip_grad=-1.0), "--clip-grad"),
    (dict(dim=190), "--heads"),
    (dict(head="linear"), "--head"),
    (dict(batch_size=0), "--batch-size"),
])
@pytest.mark.parametrize("base", [SEED, OFFICIAL], ids=["seed", "official"])
def test_bad_value_raises_config_error_naming_the_flag(base, changes, flag):
    """Each bad value is a ConfigError (a UserError and a ValueError) whose message names
    the flag to fix."""
    with pytest.raises(ConfigError, match=flag) as info:
        base.replace(**changes).validate()
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_too_few_crops_rejected():
    """One global view and no local view leaves no (teacher, student) pair."""
    with pytest.raises(ConfigError, match="crops"):
        Recipe(n_global=1, n_local=0).validate()


def test_boundary_values_accepted():
    """The edges of each range are valid: momentum 0 and 1, scale low == high, K = 2."""
    OFFICIAL.replace(center_momentum=0.0, teacher_momentum=1.0, out_dim=2,
                     global_scale=(1.0, 1.0), local_scale=(0.3, 0.3)).validate()


def test_small_differs_from_official_only_where_it_says():
    """The small recipe is the official one with the changes listed in config.py; every
    other field (temperatures of the student, centering, schedules' ends, crops'
    counts) is the paper's."""
    small, official = get_recipe("small"), OFFICIAL
    changed = {f.name for f in dataclasses.fields(Recipe)
               if getattr(small, f.name) != getattr(official, f.name)}
    assert changed == {
        "name", "head_bn", "out_dim", "head_hidden_dim", "head_bottleneck_dim",
        "teacher_temp", "warmup_teacher_temp_epochs", "dim",
        "mlp_dim", "depth", "drop_path", "batch_size", "lr", "warmup_epochs",
        "teacher_momentum", "n_local", "global_scale", "local_scale", "flip_p",
        "solarize_p", "epochs", "pos_embed_std"}
    assert small.head == "official" and small.head_bn
    assert small.student_temp == official.student_temp == 0.1


@pytest.mark.parametrize("natural, flip, solarize", [(True, 0.5, 0.2), (False, 0.0, 0.0)])
def test_auto_augmentations_follow_the_dataset(natural, flip, solarize):
    """'auto' (None) flip and solarisation: the official values on photographs, off on
    digits. Values set explicitly are kept whatever the data."""
    r = get_recipe("small").for_dataset(natural)
    assert (r.flip_p, r.solarize_p) == (flip, solarize)
    fixed = get_recipe("small").replace(flip_p=0.3).for_dataset(natural)
    assert fixed.flip_p == 0.3
    assert SEED.for_dataset(natural) == SEED  # the paper's presets have no 'auto' field


def test_auto_augmentation_must_be_decided_before_cropping():
    from dinobench.dino.multicrop import MultiCropConfig
    with pytest.raises(ValueError, match="for_dataset"):
        MultiCropConfig.from_recipe(get_recipe("small"), 32, 8, (0.5,), (0.5,))


def test_quick_profile_leaves_the_small_recipe_sized_as_it_is():
    from dinobench.config import PROFILES
    quick = PROFILES["quick"]
    assert quick.changes_for("small") == {"epochs": 30}
    assert quick.changes_for("seed") == quick.changes  # the paper's presets: unchanged
    assert quick.changes_for("seed") is not quick.changes  # a copy the caller may change
