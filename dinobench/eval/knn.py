"""Weighted k-nearest-neighbour classification on frozen features (DINO, Sec. 4.1;
Wu et al. 2018): cosine similarity to the whole train bank, the top k neighbours vote
with weight ``exp(sim / temperature)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import eval_precision


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_bytes: int = 256 * 2**20
                 ) -> torch.Tensor:
    """Predicted labels ``(N_test,)`` (int64, on the features' device).

    Features are L2-normalised here, so raw features may be passed. The similarity matrix
    is built ``chunk_bytes`` at a time, so 50,000 x 10,000 fits on any device. ``k`` larger
    than the bank uses the whole bank. Ties: among neighbours with equal similarity at the
    k-th place ``topk`` picks any; among classes with equal votes the lowest label wins.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if train_features.ndim != 2 or test_features.ndim != 2 or (
            train_features.shape[1] != test_features.shape[1]):
        raise ValueError(f"features must be (N, D) with the same D, got "
                         f"{tuple(train_features.shape)} and {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"{train_features.shape[0]} train features but train_labels has "
                         f"shape {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("the train bank is empty")
    labels = train_labels.to(train_features.device).long()
    C = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= C:
        raise ValueError(f"train labels must lie in [0, {C}) for num_classes={C}, got "
                         f"[{int(labels.min())}, {int(labels.max())}]; pass the dataset's "
                         "class count as num_classes")
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    # A chunk holds its similarity rows and its one-hot votes within chunk_bytes.
    rows = max(1, chunk_bytes // (4 * max(bank.shape[0], k * C)))
    preds = []
    with eval_precision(bank.device):  # float32 similarities, whatever autocast is on
        for i in range(0, test_features.shape[0], rows):
            query = F.normalize(test_features[i:i + rows].float().to(bank.device), dim=1)
            sim = query @ bank.T  # (rows, N_train)
            top_sim, top_idx = sim.topk(k, dim=1)
            # Shifting by the row's best similarity rescales a row's votes by one constant,
            # so the winner is unchanged and exp cannot overflow at small temperatures.
            weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
            # Votes as a sum over one-hot labels, not scatter_add_: a plain reduction has
            # the same (deterministic) kernel on every device and torch version.
            one_hot = F.one_hot(labels[top_idx], C).to(weights.dtype)  # (rows, k, C)
            votes = (one_hot * weights[..., None]).sum(1)
            preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=bank.device)
    return torch.cat(preds)


def knn_top1(train_features, train_labels, test_features, test_labels, **kw) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_classify(train_features, train_labels, test_features, **kw)
    return 100.0 * (pred.cpu() == test_labels.cpu()).float().mean().item()
