"""Failures a long run must not hide: a non-finite loss, and collapse.

DINO has two trivial solutions (Caron et al. 2021, Sec. 5.3): every image mapped to the
same one-hot output (teacher entropy near 0), or to the uniform output (entropy near
log K). Centering fights the first, sharpening the second; when the balance is wrong the
loss still looks fine. A collapsed model is flagged in the log and in the result rows and
left out of means, never averaged in silently.
"""

from __future__ import annotations


class TrainingError(Exception):
    """The run cannot go on (its message says why and what to change)."""


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int):
        self.step = step
        super().__init__(
            f"the loss became non-finite (NaN or inf) at step {step}; training stopped and "
            "the last checkpoint before it is kept. Lower --lr, raise --warmup-epochs or "
            "--clip-grad a little, or check the input data")


# A teacher whose mean entropy stays within this fraction of log K from either end.
COLLAPSE_BAND = 0.05
# ... for this many final epochs (all of them when the run is shorter).
COLLAPSE_EPOCHS = 3


def collapse_reason(history: list[dict], band: float = COLLAPSE_BAND,
                    patience: int = COLLAPSE_EPOCHS) -> str | None:
    """Why the last ``patience`` epochs look collapsed, or None.

    Judged on the teacher's mean output entropy H relative to log K: ``H < band * log K``
    is collapse to one output, ``H > (1 - band) * log K`` collapse to uniform.
    """
    if not history:
        return None
    tail = history[-patience:]
    log_k = tail[-1]["log_k"]
    ratios = [rec["teacher_entropy"] / log_k for rec in tail]
    if all(r < band for r in ratios):
        return (f"teacher entropy {tail[-1]['teacher_entropy']:.3f} nats stayed below "
                f"{band:.0%} of log K = {log_k:.2f} for the last {len(tail)} epochs "
                "(collapse to one output)")
    if all(r > 1 - band for r in ratios):
        return (f"teacher entropy {tail[-1]['teacher_entropy']:.3f} nats stayed above "
                f"{1 - band:.0%} of log K = {log_k:.2f} for the last {len(tail)} epochs "
                "(collapse to a uniform output)")
    return None


def knn_at_chance(knn_top1: float, num_classes: int, margin: float = 2.0) -> bool:
    """k-NN accuracy (%) within ``margin`` points of guessing (100 / classes)."""
    return knn_top1 <= 100.0 / num_classes + margin


__all__ = ["COLLAPSE_BAND", "COLLAPSE_EPOCHS", "NonFiniteLoss", "TrainingError",
           "collapse_reason", "knn_at_chance"]
