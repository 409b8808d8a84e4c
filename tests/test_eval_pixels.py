"""The raw-pixel reference: its features, its k-NN and probe rows on a case worked out by
hand, and the note under the summary naming what does not beat it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dinobench.data.registry import Dataset, DatasetSpec
from dinobench.eval.knn import knn_top1
from dinobench.eval.pixels import pixel_features
from dinobench.experiments import EvalConfig, evaluate_models, random_init_like
from dinobench.report import to_markdown
from dinobench.vit import ViTConfig

# 2x2 grey images; with mean 0.5 and std 0.5 a pixel of 255 becomes +1 and 0 becomes -1.
SPEC = DatasetSpec("toy", 2, 2, 1, (0.5,), (0.5,), ("0", "1"), 1)


def _images(*pixels) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.uint8).view(-1, 1, 2, 2)


A, B, C = (255, 255, 0, 0), (0, 0, 255, 255), (255, 0, 255, 0)
# Bank: A is class 0; B, C and a copy of B are class 1.
TRAIN, TRAIN_LABELS = _images(A, B, C, B), torch.tensor([0, 1, 1, 1])
# Worked out by hand with k = 20 (the whole bank), votes exp(cos / 0.07):
#   A           -> cos 1 with A only                      -> class 0 (right)
#   C           -> cos 1 with C only                      -> class 1 (right)
#   (-1,-1,1,-1) -> cos 0.5 with C and both Bs, -0.5 with A  -> class 1 (right)
#   (-1,1,-1,1)  -> cos 0 with A and both Bs, -1 with C     -> 2 + e^(-1/0.07) > 1 -> class 1
#                                                             (wrong: it is labelled 0)
TEST, TEST_LABELS = _images(A, C, (0, 0, 255, 0), (0, 255, 0, 255)), torch.tensor(
    [0, 1, 1, 0])


def toy() -> Dataset:
    return Dataset(SPEC, TRAIN, TRAIN_LABELS, TEST, TEST_LABELS)


def test_pixel_features_are_the_normalised_flattened_images():
    feats = pixel_features(_images(A, (0, 255, 0, 255)), (0.5,), (0.5,))
    assert feats.tolist() == [[1, 1, -1, -1], [-1, 1, -1, 1]]
    # Per channel, channel-major: ((x / 255) - mean_c) / std_c.
    rgb = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    rgb[0, 1, 0, 1] = 255
    feats = pixel_features(rgb, (0.0, 0.5, 0.25), (1.0, 0.25, 0.5))
    expected = [0.0] * 4 + [-2.0, 2.0, -2.0, -2.0] + [-0.5] * 4
    assert feats.shape == (1, 12) and feats[0].tolist() == pytest.approx(expected)
    assert pixel_features(rgb[:0], (0.0,) * 3, (1.0,) * 3).shape == (0, 12)


def test_pixels_rows_give_the_hand_worked_knn_and_the_probe():
    ds = toy()
    vit = random_init_like(ViTConfig(image_size=2, grid=2, in_chans=1, dim=8, depth=1,
                                     heads=1, mlp_dim=8), 0)
    cfg = EvalConfig(knn=((20, 0.07),), probe_cs=(1.0,), attention_images=0)
    # Validation: the second B (row 3) against a bank of rows 0-2: its twin B -> right.
    val = (torch.tensor([3]), torch.tensor([0, 1, 2]))
    rows, _ = evaluate_models(ds, {"vit": vit}, seed=0, context={}, cfg=cfg, val=val)
    got = {r["metric"]: r for r in rows if r["model"] == "pixels"}
    assert set(got) == {"knn_top1", "val_knn_top1", "linear_top1"}  # no attention rows
    assert got["knn_top1"]["value"] == pytest.approx(75.0)
    assert got["val_knn_top1"]["value"] == pytest.approx(100.0)
    assert got["val_knn_top1"]["n_val"] == 1
    # The probe with its one C (nothing to choose, so fit on all 4 train images):
    # standardised +-1 pixels and a logistic regression, by scikit-learn directly.
    train = (np.array([A, B, C, B]) / 255 - 0.5) / 0.5
    test = (TEST.view(4, 4).numpy() / 255 - 0.5) / 0.5
    scaler = StandardScaler().fit(train)
    model = LogisticRegression(C=1.0, max_iter=300).fit(scaler.transform(train),
                                                        TRAIN_LABELS.numpy())
    expect = 100.0 * np.mean(model.predict(scaler.transform(test)) == TEST_LABELS.numpy())
    assert got["linear_top1"]["value"] == pytest.approx(expect)
    assert got["linear_top1"]["C"] == 1.0 and got["linear_top1"]["n_labels"] == 4


# Shrinking 4 px to 2 with antialiased bilinear filtering, by hand: the triangle filter
# stretched by the factor 2 (half-width 2 input pixels) centred on input coordinate 0.5
# for output 0 weighs inputs 0, 1, 2 by 0.75, 0.75, 0.25, normalised: 3/7, 3/7, 1/7;
# output 1 mirrors it. The 2-D filter is the product of the 1-D ones.
SHRINK_4_TO_2 = torch.tensor([[3.0, 3.0, 1.0, 0.0], [0.0, 1.0, 3.0, 3.0]],
                             dtype=torch.float64) / 7


def test_a_model_that_reads_resized_images_gets_the_resized_pixels_too():
    """4x4 images read by a 2x2 model: beside ``pixels`` (4x4, as stored) come rows of
    ``pixels-2px``, whose features are the images shrunk by the hand-worked filter above
    and whose k-NN is the one on those. A model at the stored size, or at a larger one,
    gets none. The images: class 0 a little brighter on the left, class 1 on the right,
    under noise that shrinking averages away, so the 2-px pixels read a better k-NN than
    the 4-px ones (83 against 58%) and a mixed-up size shows."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 160, (52, 1, 4, 4), generator=g)
    labels = torch.arange(52) % 2
    side = torch.zeros(52, 1, 4, 4, dtype=torch.long)
    side[labels == 0, :, :, :2] = 30
    side[labels == 1, :, :, 2:] = 30
    images = (noise + side).to(torch.uint8)
    train, test, train_labels, test_labels = images[:40], images[40:], labels[:40], labels[40:]
    ds = Dataset(DatasetSpec("toy4", 4, 2, 1, (0.25,), (0.5,), ("0", "1"), 1), train,
                 train_labels, test, test_labels)
    cfg = EvalConfig(knn=((20, 0.07),), probe_cs=(1.0,), attention_images=0)
    small = random_init_like(ViTConfig(image_size=2, grid=2, in_chans=1, dim=8, depth=1,
                                       heads=1, mlp_dim=8), 0)
    rows, _ = evaluate_models(ds, {"vit": small}, seed=0, context={"image_size": 2}, cfg=cfg)

    def shrunk(x):
        x = SHRINK_4_TO_2 @ (x[:, 0].double() / 255) @ SHRINK_4_TO_2.T
        return ((x - 0.25) / 0.5).flatten(1)

    torch.testing.assert_close(pixel_features(train, (0.25,), (0.5,), size=2).double(),
                               shrunk(train), atol=1e-6, rtol=0)
    expected = knn_top1(shrunk(train), train_labels, shrunk(test), test_labels)
    got = {r["metric"]: r for r in rows if r["model"] == "pixels-2px"}
    assert set(got) == {"knn_top1", "linear_top1"}
    assert got["knn_top1"]["value"] == pytest.approx(expected)
    stored = {r["metric"]: r for r in rows if r["model"] == "pixels"}
    stored_knn = knn_top1(((train.double() / 255 - 0.25) / 0.5).flatten(1), train_labels,
                          ((test.double() / 255 - 0.25) / 0.5).flatten(1), test_labels)
    assert stored["knn_top1"]["value"] == pytest.approx(stored_knn)
    # Shrinking averages the noise away: 10 of the 12 test images against 7 of 12.
    assert (expected, stored_knn) == pytest.approx((100 * 10 / 12, 100 * 7 / 12))
    # Each reference's rows name the side its pixels were read at.
    assert (stored["knn_top1"]["image_size"], got["knn_top1"]["image_size"]) == (4, 2)
    same = random_init_like(ViTConfig(image_size=4, grid=2, in_chans=1, dim=8, depth=1,
                                      heads=1, mlp_dim=8), 0)
    rows, _ = evaluate_models(ds, {"vit": same}, seed=0, context={}, cfg=cfg)
    assert {r["model"] for r in rows if r["model"].startswith("pixels")} == {"pixels"}
    # Nor does a model that reads them enlarged: upsampling adds nothing a k-NN can read.
    large = random_init_like(ViTConfig(image_size=8, grid=2, in_chans=1, dim=8, depth=1,
                                       heads=1, mlp_dim=8), 0)
    rows, _ = evaluate_models(ds, {"vit": large}, seed=0, context={}, cfg=cfg)
    assert {r["model"] for r in rows if r["model"].startswith("pixels")} == {"pixels"}


def _row(model, value, dataset="d", metric="knn_top1", seed=0):
    return {"dataset": dataset, "model": model, "metric": metric, "value": value,
            "seed": seed}


def test_summary_names_the_models_at_or_below_raw_pixels():
    rows = [_row("dino-x", 70.0), _row("dino-x", 80.0, seed=1), _row("random-init", 76.0),
            _row("pixels", 75.0), _row("pixels", 75.0, seed=1), _row("dino-x", 60.0, "e"),
            _row("pixels", 50.0, "e"), _row("dino-x", 40.0, "f"),
            _row("random-init", 30.0, metric="linear_top1")]
    md = to_markdown(rows)
    summary = md.split("## All rows")[0]
    # d: dino-x's mean 75.00 equals pixels' (at or below), random-init beats it; e: dino-x
    # beats pixels; f has no pixel rows, so nothing is said about it.
    assert "- d: dino-x (75.00); raw pixels 75.00" in summary
    assert "random-init (76" not in summary and "- e:" not in summary and "- f" not in summary
    rows = [r for r in rows if r["dataset"] == "e"] + [_row("dino-x", 1.0, "e", "linear_top1")]
    assert "Every model's k-NN (k 20) is above the raw pixels'." in to_markdown(rows)
    # Beside the pixels resized to the model's input, the stronger of the two is the bar:
    # 77 beats the stored pixels' 75 and not the resized ones' 78.
    rows = [_row("dino-x", 77.0), _row("pixels", 75.0), _row("pixels-16px", 78.0),
            _row("dino-x", 1.0, metric="linear_top1")]
    summary = to_markdown(rows).split("## All rows")[0]
    assert "- d: dino-x (77.00); raw pixels 75.00, pixels-16px 78.00" in summary
    assert "pixels-16px (78" not in summary
