"""Frozen features: the CLS token, the last blocks' CLS tokens and the mean-pooled patch
tokens (DINO's ``--avgpool_patchtokens``), against a float64 computation by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from dinobench.errors import ConfigError
from dinobench.eval.features import extract_features, frozen_features, to_model_input
from dinobench.experiments import EvalConfig
from dinobench.report import to_markdown
from dinobench.run import RunOptions, check_options, evaluation_config
from dinobench.vit import ViT, ViTConfig

MEAN, STD = (0.5,), (0.25,)
DIM, DEPTH = 32, 3


def _vit() -> ViT:
    """A random ViT with every weight moved off its initial value, the norms included,
    so a feature that skipped or misplaced a norm would differ."""
    vit = ViT(ViTConfig(image_size=16, grid=4, in_chans=1, dim=DIM, depth=DEPTH, heads=2,
                        mlp_dim=64))
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


def _by_hand(vit: ViT, images: torch.Tensor, n_last_blocks: int) -> torch.Tensor:
    """CLS of the last ``n_last_blocks`` blocks, then the mean of the last block's patch
    tokens, each through the final norm, in float64."""
    model = copy.deepcopy(vit).double()
    x = model.tokens(to_model_input(images, MEAN, STD, 16).double())
    outputs = []
    with torch.no_grad():
        for block in model.blocks:
            x, _ = block(x)
            outputs.append(x)
        cls = [model.norm(out[:, 0]) for out in outputs[-n_last_blocks:]]
        patches = model.norm(outputs[-1][:, 1:]).mean(dim=1)
    return torch.cat([*cls, patches], dim=1)


@pytest.mark.parametrize("n_last_blocks", [1, 2, DEPTH])
def test_patch_mean_appends_the_last_blocks_normed_patch_tokens(n_last_blocks):
    vit, images = _vit(), _images()
    got = extract_features(vit, images, MEAN, STD, batch_size=4,
                           n_last_blocks=n_last_blocks, patch_mean=True)
    want = _by_hand(vit, images, n_last_blocks)
    assert got.shape == (6, (n_last_blocks + 1) * DIM) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # The CLS part is the features without patch_mean.
    assert torch.equal(got[:, :n_last_blocks * DIM],
                       extract_features(vit, images, MEAN, STD, batch_size=4,
                                        n_last_blocks=n_last_blocks))


def test_without_patch_mean_the_features_are_the_backbones_output():
    vit, images = _vit(), _images()
    x = to_model_input(images, MEAN, STD, 16)
    with torch.no_grad():
        assert torch.equal(frozen_features(vit, x), vit(x))
        assert torch.equal(extract_features(vit, images, MEAN, STD), vit(x))
    torch.testing.assert_close(extract_features(vit, images, MEAN, STD).double(),
                               _by_hand(vit, images, 1)[:, :DIM], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n_last_blocks", "patch_mean", "width"),
                         [(1, False, DIM), (1, True, 2 * DIM), (2, True, 3 * DIM)])
def test_no_images_give_no_rows_of_the_right_width(n_last_blocks, patch_mean, width):
    empty = torch.zeros(0, 1, 16, 16, dtype=torch.uint8)
    got = extract_features(_vit(), empty, MEAN, STD, n_last_blocks=n_last_blocks,
                           patch_mean=patch_mean)
    assert got.shape == (0, width)


def test_eval_feature_option_reaches_the_evaluation_config():
    assert evaluation_config(RunOptions()).patch_mean is False
    assert evaluation_config(RunOptions(eval_feature="cls+patch-mean")).patch_mean is True
    assert EvalConfig().patch_mean is False
    with pytest.raises(ConfigError, match="--eval-feature 'avg' is not one of: cls, "
                                          "cls\\+patch-mean"):
        check_options(RunOptions(eval_feature="avg"))


def test_results_say_which_feature_their_tables_use():
    rows = [{"dataset": "digits", "model": "dino-small", "metric": "knn_top1", "value": 90.0,
             "seed": 0, "epochs": 1, "n_train": 100}]
    assert to_markdown(rows, {"eval_feature": "cls"}).startswith(
        "ViT features (k-NN and linear probes): the CLS token after the final norm.\n\n|")
    assert "mean of the last block's patch tokens" in to_markdown(
        rows, {"eval_feature": "cls+patch-mean"}).splitlines()[0]
    assert to_markdown(rows, {}) == to_markdown(rows)  # older results: no claim made
