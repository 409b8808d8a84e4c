"""Failures a long run must not hide: a non-finite loss, and collapse.

DINO has two trivial solutions (Caron et al. 2021, Sec. 5.3). In both the student has
nothing left to learn, so KL(teacher || student) vanishes:

- every image mapped to the same one-hot output: the batch-mean target is one-hot, its
  entropy (``marginal_entropy``) near 0. The per-image entropy is near 0 as well, but so
  is that of the sharp teacher DINO aims for, which spreads its images over many outputs:
  per-image entropy alone cannot tell the two apart.
- every image mapped to the uniform output: per-image entropy (``teacher_entropy``) near
  log K.

Centering fights the first, sharpening the second; when the balance is wrong the loss
still looks fine. A collapsed model is flagged in the log and in the result rows and left
out of means, never averaged in silently. The diagnostics themselves are computed in
``diagnostics.py`` and logged per epoch by the trainer.
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


# Collapse thresholds, as fractions of log K (the largest entropy over K outputs): an
# entropy within this fraction of 0 or of log K, and a KL below this fraction of log K ...
COLLAPSE_BAND = 0.05
# ... for this many final epochs (all of them when the run is shorter).
COLLAPSE_EPOCHS = 3


def collapse_reason(history: list[dict], band: float = COLLAPSE_BAND,
                    patience: int = COLLAPSE_EPOCHS) -> str | None:
    """Why the last ``patience`` epochs look collapsed, or None.

    Every epoch of that tail must meet both conditions of a collapse, with ``L = log K``:

    - one output: ``marginal_entropy < band * L`` and ``kl < band * L``;
    - uniform: ``teacher_entropy > (1 - band) * L`` and ``kl < band * L``.

    A sharp teacher (``teacher_entropy`` near 0) whose batch-mean target keeps a high
    entropy is what DINO aims for and is not flagged. Records from before
    ``marginal_entropy`` was logged cannot tell a collapse to one output from a sharp
    teacher, so only the uniform collapse is judged on them; records without ``kl`` are
    judged on the entropies alone.
    """
    if not history:
        return None
    tail = history[-patience:]
    log_k = tail[-1]["log_k"]
    last = tail[-1]

    def kl_vanishes(rec: dict) -> bool:
        return rec.get("kl") is None or rec["kl"] < band * log_k

    def kl_note() -> str:
        if last.get("kl") is None:
            return ""
        return f" with KL(teacher || student) {last['kl']:.4f} nats"

    span = f"for the last {len(tail)} epochs" if len(tail) > 1 else "in its only epoch"
    if all(rec.get("marginal_entropy") is not None
           and rec["marginal_entropy"] < band * log_k and kl_vanishes(rec) for rec in tail):
        used = (f", {last['outputs_used']} output(s) in use"
                if last.get("outputs_used") is not None else "")
        return (f"entropy of the batch-mean teacher output {last['marginal_entropy']:.3f} "
                f"nats stayed below {band:.0%} of log K = {log_k:.2f}{kl_note()} {span}"
                f"{used} (collapse to one output)")
    if all(rec["teacher_entropy"] > (1 - band) * log_k and kl_vanishes(rec) for rec in tail):
        return (f"teacher entropy {last['teacher_entropy']:.3f} nats stayed above "
                f"{1 - band:.0%} of log K = {log_k:.2f}{kl_note()} {span} "
                "(collapse to a uniform output)")
    return None


def knn_at_chance(knn_top1: float, num_classes: int, margin: float = 2.0) -> bool:
    """k-NN accuracy (%) within ``margin`` points of guessing (100 / classes)."""
    return knn_top1 <= 100.0 / num_classes + margin


__all__ = ["COLLAPSE_BAND", "COLLAPSE_EPOCHS", "NonFiniteLoss", "TrainingError",
           "collapse_reason", "knn_at_chance"]
