"""Time to accuracy: when a run first reaches a validation k-NN level.

A run is judged by its validation k-NN over training time, not by its loss (DESIGN.md).
Each dataset has a few levels (%); the answer for a level is the training time and step
of the first evaluation at or above it, or None when the run never got there: not
reaching a level is a result, reported as such.
"""

from __future__ import annotations

# Validation k-NN levels (%) per dataset: from a little above a random ViT's k-NN to what
# a good representation reaches (digits and MNIST: random init about 50%, raw pixels
# 95-98%; CIFAR-10: random init about 30%, raw pixels 39%, good self-supervised ViTs
# 70-85%; STL-10 is harder at 96 px with 5,000 labels).
KNN_LEVELS: dict[str, tuple[float, ...]] = {
    "digits": (50.0, 80.0, 90.0, 95.0),
    "mnist": (50.0, 80.0, 90.0, 95.0),
    "cifar10": (40.0, 60.0, 80.0),
    "stl10": (30.0, 40.0, 50.0, 60.0),
}
# MNIST digits composited onto backgrounds (mnist-<background>-<size>): clutter makes
# them far harder than plain MNIST, so the levels start lower.
COMPOSITE_LEVELS = (30.0, 50.0, 70.0, 90.0)
DEFAULT_LEVELS = (30.0, 50.0, 70.0, 90.0)  # any other dataset


def knn_levels(dataset: str) -> tuple[float, ...]:
    if dataset in KNN_LEVELS:
        return KNN_LEVELS[dataset]
    if dataset.startswith("mnist-"):
        return COMPOSITE_LEVELS
    return DEFAULT_LEVELS


def first_reaching(history: list[dict], level: float, key: str = "val_knn_top1"
                   ) -> dict | None:
    """The first record whose ``key`` is at or above ``level``; None if none is.
    Records without the key (epochs not evaluated) are skipped."""
    for rec in history:
        value = rec.get(key)
        if value is not None and value >= level:
            return rec
    return None


def time_to_knn(history: list[dict], levels: tuple[float, ...],
                key: str = "val_knn_top1") -> list[dict]:
    """One score per level: ``{"metric": "time_to_knn", "threshold": level, "value":
    train seconds or None, "steps": optimizer steps or None, "images_seen": ...}``,
    read off the trainer's per-epoch records (``train_seconds``, ``step``,
    ``images_seen``)."""
    scores = []
    for level in levels:
        rec = first_reaching(history, level, key)
        scores.append({"metric": "time_to_knn", "threshold": level,
                       "value": None if rec is None else rec["train_seconds"],
                       "steps": None if rec is None else rec["step"],
                       "images_seen": None if rec is None else rec.get("images_seen")})
    return scores


def training_scores(history: list[dict]) -> list[dict]:
    """The cost of a run from its per-epoch records: ``train_seconds`` (training only),
    ``eval_seconds`` (the evaluations during training) and ``images_per_s``
    (pre-training images per second of training time)."""
    if not history:
        return []
    last = history[-1]
    seconds = last["train_seconds"]
    return [{"metric": "train_seconds", "value": seconds, "steps": last["step"]},
            {"metric": "eval_seconds", "value": sum(h.get("eval_seconds", 0.0)
                                                    for h in history)},
            {"metric": "images_per_s", "value": last["images_seen"] / max(seconds, 1e-9),
             "images_seen": last["images_seen"]}]


# Rows whose value is a wall-clock measurement: they differ between identical runs.
TIMED_METRICS = ("time_to_knn", "train_seconds", "eval_seconds", "images_per_s")
