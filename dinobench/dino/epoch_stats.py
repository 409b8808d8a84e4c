"""What an epoch of training reports: running sums on the device, read once per epoch.

Every step adds its loss and the collapse diagnostics of its targets (``diagnostics.py``)
to sums kept on the device, and a non-finite loss marks its step there too, so the step
never waits on the host. Once per epoch the trainer synchronises anyway; then the sums
become the epoch's record (means over the steps, all-reduced over ranks) and the watch is
read, so a NaN stops the run before a checkpoint could save the broken weights.

Under torchrun each rank keeps its own sums and watch; both belong to the trainer's
per-rank state, so a run saved in the middle of an epoch logs that epoch as if it had not
stopped.
"""

from __future__ import annotations

import math

import torch

from ..distributed import DistInfo, all_reduce_sum_, min_over_ranks_
from .diagnostics import argmax_counts, batch_mean, distribution_entropy, teacher_entropy
from .faults import NonFiniteLoss

# Per-step values summed on the device and read by the host once per epoch: means over
# steps of the scalars, and per output how often it was the argmax of a teacher target
# (the outputs in use over the epoch).
SCALAR_SUMS = ("loss", "teacher_entropy", "marginal_entropy")
SUMS = (*SCALAR_SUMS, "argmax_counts")


@torch.no_grad()
def step_diagnostics(targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """A step's collapse diagnostics of the targets, as device tensors."""
    # The batch mean over all ranks, renormalised: the sum of the ranks' means is
    # world_size times the global mean (every rank holds as many rows).
    p_mean = all_reduce_sum_(batch_mean(targets))
    return {"teacher_entropy": teacher_entropy(targets),
            "marginal_entropy": distribution_entropy(p_mean / p_mean.sum()),
            "argmax_counts": argmax_counts(targets)}


class EpochStats:
    """One rank's running sums for the current epoch and its non-finite-loss watch.

    ``add`` takes a step's outputs without synchronising; ``means`` and ``check_finite``
    read the device (and, under torchrun, every rank) and belong at the end of an epoch.
    """

    def __init__(self, out_dim: int, device: torch.device, dist: DistInfo):
        self.out_dim, self.device, self.dist = out_dim, device, dist
        self.sums = self._zero_sums()
        # The step counter on the device, so marking a bad step needs no host value.
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        sums = {k: torch.zeros((), device=self.device) for k in SCALAR_SUMS}
        sums["argmax_counts"] = torch.zeros(self.out_dim, dtype=torch.long,
                                            device=self.device)
        return sums

    def reset(self) -> None:
        """Start a new epoch's sums (the watch runs on across epochs)."""
        self.sums = self._zero_sums()

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """Add one step's outputs (device tensors) and watch its loss; no sync."""
        for k in SUMS:
            self.sums[k] += out[k]
        bad = ~torch.isfinite(out["loss"]) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, self.step_t, self.first_bad_step)
        self.step_t += 1

    def check_finite(self) -> None:
        """Raise on every rank if any rank saw a non-finite loss (a NaN on one rank
        reaches every rank's weights through the gradient all-reduce)."""
        never = torch.iinfo(torch.long).max
        first = torch.where(self.first_bad_step < 0, never, self.first_bad_step)
        bad = int(min_over_ranks_(first.clone()))
        if bad != never:
            raise NonFiniteLoss(bad)

    def means(self, steps: int) -> dict:
        """The epoch record's summed part: means over the ``steps`` steps done this epoch
        and over all ranks (every rank gets the same values)."""
        n = len(SCALAR_SUMS)
        # One all-reduce for all: the counts travel as float32, whose sums of non-negative
        # integers are 0 exactly when every term is, which is all outputs_used reads.
        sums = torch.cat([torch.stack([self.sums[k] for k in SCALAR_SUMS]),
                          self.sums["argmax_counts"].float()])
        all_reduce_sum_(sums)
        loss, h, h_marginal = (sums[:n] / (steps * self.dist.world_size)).tolist()
        return {
            "loss": loss,
            # Mean over pairs of KL(teacher || student) = cross-entropy - target entropy,
            # because every teacher view enters the same number of pairs (the targets are
            # the ones the loss used, in either centering mode).
            "kl": loss - h,
            # Mean over images of each image's target entropy (sharpness per image).
            "teacher_entropy": h,
            # Entropy of the batch-mean target: near 0 when every image picks one output.
            "marginal_entropy": h_marginal,
            # Outputs that were the argmax of at least one target during the epoch.
            "outputs_used": int(sums[n:].count_nonzero()),
            "log_k": math.log(self.out_dim),
        }

    # --- state: this rank's part of the trainer's ``ranks`` entry ---------------------
    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()},
                "first_bad_step": int(self.first_bad_step)}

    def load_state_dict(self, state: dict, step: int) -> None:
        """``state``: this rank's entry of a checkpoint; ``step``: optimizer steps done."""
        self.step_t.fill_(step)
        # Sums a checkpoint lacks (saved before they were kept) restart from 0.
        self.sums = self._zero_sums() | {k: v.to(self.device)
                                         for k, v in state["sums"].items()}
        self.first_bad_step.fill_(state["first_bad_step"])


def epoch_line(rec: dict, epochs: int, out_dim: int) -> str:
    """An epoch record as the one line the trainer logs."""
    return (f"epoch {rec['epoch']:>4}/{epochs}  loss {rec['loss']:.4f}  "
            f"H(teacher) {rec['teacher_entropy']:.3f}  "
            f"H(mean) {rec['marginal_entropy']:.3f}/{rec['log_k']:.3f}  "
            f"KL {rec['kl']:.4f}  "
            f"used {rec['outputs_used']}/{out_dim}  lr {rec['lr']:.2e}  "
            f"{rec['images_per_s']:,.0f} img/s"
            + (f"  val knn {rec['val_knn_top1']:.2f}%" if "val_knn_top1" in rec else ""))
