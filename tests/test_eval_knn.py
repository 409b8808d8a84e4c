"""knn_classify against a float64 brute force with explicit loops over test points."""

import math

import pytest
import torch

from dinobench import knn_classify
from dinobench.eval.knn import knn_top1


def brute_force(train, labels, test, k, temperature, num_classes):
    """Predicted label and the vote margin (best minus runner-up, relative) per test
    point, plus the similarity gap at the k-th place (0 when k covers the bank)."""
    out = []
    for q in test.double().tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, y in zip(train.double().tolist(), labels.tolist()):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x)) / (qn * xn), y))
        sims.sort(key=lambda s: -s[0])
        kk = min(k, len(sims))
        votes = [0.0] * num_classes
        for s, y in sims[:kk]:
            votes[y] += math.exp(s / temperature)
        best = max(votes)
        pred = min(c for c in range(num_classes) if votes[c] == best)  # ties: lowest label
        runner = max(v for c, v in enumerate(votes) if c != pred)
        gap = sims[kk - 1][0] - sims[kk][0] if kk < len(sims) else math.inf
        out.append((pred, (best - runner) / best, gap))
    return out


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 1.0),
                                            (200, 0.1)])
def test_matches_brute_force(k, temperature):
    gen = torch.Generator().manual_seed(k)
    train = torch.randn(120, 6, generator=gen)
    labels = torch.randint(0, 4, (120,), generator=gen)
    test = torch.randn(40, 6, generator=gen)
    pred = knn_classify(train, labels, test, k=k, temperature=temperature, num_classes=4)
    ref = brute_force(train, labels, test, k, temperature, 4)
    # float32 and float64 may only disagree on genuine near-ties: equal votes to 1e-4 or
    # equal similarities at the k-th place to 1e-5. There must be few of those.
    unclear = [m < 1e-4 or g < 1e-5 for _, m, g in ref]
    assert sum(unclear) <= 2
    for p, (r, _, _), u in zip(pred.tolist(), ref, unclear):
        assert p == r or u


@pytest.mark.parametrize("labels", [[1, 2], [2, 1]])
def test_tied_votes_go_to_the_lowest_label(labels):
    # Both neighbours are at cosine 1/sqrt(2) from the query: equal weights, equal votes.
    train = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    test = torch.tensor([[1.0, 0.0, 0.0]])
    pred = knn_classify(train, torch.tensor(labels), test, k=2, num_classes=3)
    assert pred.tolist() == [1]


def test_k_larger_than_a_class_and_larger_than_the_bank():
    gen = torch.Generator().manual_seed(0)
    query = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    near = query + 0.01 * torch.randn(2, 4, generator=gen)  # class 0: two close images
    far = torch.tensor([[1.0, 1.0, 0.0, 0.0]]) + 0.05 * torch.randn(30, 4, generator=gen)
    train = torch.cat([near, far])
    labels = torch.tensor([0, 0] + [1] * 30)
    for k, t in ((20, 0.07), (20, 10.0), (500, 0.07), (500, 10.0)):
        ref = brute_force(train, labels, query, k, t, 2)[0][0]
        assert knn_classify(train, labels, query, k=k, temperature=t).item() == ref
    # Sharp weights: two close neighbours outvote eighteen distant ones; flat weights:
    # the majority wins. k beyond the bank is the whole bank.
    assert knn_classify(train, labels, query, k=20, temperature=0.07).item() == 0
    assert knn_classify(train, labels, query, k=20, temperature=10.0).item() == 1
    assert torch.equal(knn_classify(train, labels, query, k=500),
                       knn_classify(train, labels, query, k=32))


def test_chunking_gives_identical_predictions():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(300, 8, generator=gen)
    labels = torch.randint(0, 5, (300,), generator=gen)
    test = torch.randn(97, 8, generator=gen)
    one = knn_classify(train, labels, test, chunk_bytes=2**30)
    for chunk in (4 * 300, 4 * 300 * 7, 4 * 300 * 50):  # 1, 7 and 50 rows per chunk
        assert torch.equal(knn_classify(train, labels, test, chunk_bytes=chunk), one)


def test_separable_features_give_100_and_shuffled_labels_give_chance():
    gen = torch.Generator().manual_seed(2)
    centres = torch.eye(10, 32) * 5
    y_train = torch.arange(10).repeat(50)
    y_test = torch.arange(10).repeat(20)
    x_train = centres[y_train] + 0.3 * torch.randn(500, 32, generator=gen)
    x_test = centres[y_test] + 0.3 * torch.randn(200, 32, generator=gen)
    assert knn_top1(x_train, y_train, x_test, y_test) == 100.0
    # No relation between features and labels: 10 classes give 10% up to noise
    # (binomial standard deviation of 1,000 test points: 0.95 points).
    x_train, x_test = torch.randn(2000, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    y_train = torch.randint(0, 10, (2000,), generator=gen)
    y_test = torch.randint(0, 10, (1000,), generator=gen)
    acc = knn_top1(x_train, y_train, x_test, y_test, num_classes=10)
    assert abs(acc - 10.0) < 5 * 0.95


def test_raw_features_are_normalised():
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(50, 4, generator=gen), torch.randn(9, 4, generator=gen)
    labels = torch.randint(0, 3, (50,), generator=gen)
    scale = torch.rand(50, 1, generator=gen) * 100 + 0.01
    assert torch.equal(knn_classify(train * scale, labels, test * 7),
                       knn_classify(train, labels, test))


def test_errors_are_clear():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, temperature=0.0)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(x, y, torch.randn(2, 5))
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x, y[:3], x)
    with pytest.raises(ValueError, match="empty"):
        knn_classify(x[:0], y[:0], x)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, torch.tensor([0, 1, 5, 1]), x, num_classes=3)
    assert knn_classify(x, y, x[:0]).shape == (0,)
