"""Shared fixtures: one intra-op thread, a fixed seed, a tiny recipe/ViT pair."""

from __future__ import annotations

import pytest
import torch

from dinobench.config import OFFICIAL, Recipe
from dinobench.vit import ViTConfig

# The tensors here are tiny: intra-op threads only add spin-wait overhead, which on a
# shared machine makes a millisecond step take seconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_vit_cfg() -> ViTConfig:
    """A one-block ViT on 16x16 single-channel images (4x4 patches of 4 px)."""
    return ViTConfig(image_size=16, grid=4, in_chans=1, dim=32, depth=1, heads=2, mlp_dim=64)


@pytest.fixture
def tiny_recipe() -> Recipe:
    """The official recipe shrunk to CPU size; fields agree with ``tiny_vit_cfg``."""
    return OFFICIAL.replace(
        dim=32, depth=1, heads=2, mlp_dim=64, head="official", out_dim=16,
        head_hidden_dim=32, head_bottleneck_dim=8, batch_size=8, epochs=2,
        freeze_last_layer_epochs=1, n_local=2, warmup_epochs=0,
        warmup_teacher_temp_epochs=0,
    ).validate()
