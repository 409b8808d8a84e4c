"""The ``dinobench sweep`` subcommand's options and help.

The recipe flags themselves (one or more values each) come from
:func:`dinobench.sweep_grid.add_grid_flags`; what the parsed arguments become is
:func:`dinobench.sweep.options_from_args`. ``cli.py`` imports :func:`add_sweep_parser`
through :mod:`dinobench.sweep`.
"""

from __future__ import annotations

import argparse

from .config import EVAL_FEATURES, PRECISIONS, PROFILES, RECIPES
from .eval.time_to_accuracy import KNN_LEVELS
from .sweep_grid import add_grid_flags


def add_eval_feature_flag(group) -> None:
    """``--eval-feature``, the same for run and sweep."""
    group.add_argument("--eval-feature", choices=EVAL_FEATURES, default="cls",
                       help="frozen features for k-NN and the probes: the teacher's CLS "
                       "token, or CLS plus the mean of the last block's patch tokens "
                       "(DINO's avgpool evaluation) (default: cls)")

def add_precision_flag(parser) -> None:
    """``--precision``, the same for run and sweep."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast of the training step's forward passes: auto is bf16 "
                        "on CUDA and float32 on a CPU; bf16 on a CPU pays on cores with "
                        "native bf16 (AVX512-BF16, AMX); the loss, center, teacher update "
                        "and every evaluation stay float32 (default: auto)")


def add_data_flags(group) -> None:
    """The data flags, the same for run and sweep."""
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder holding <name>.npz files or torchvision's dataset "
                       "folders (default: $DINOBENCH_DATA, else ~/.cache/dinobench)")
    group.add_argument("--download", action="store_true",
                       help="let torchvision download a dataset that is not in --data-dir")
    group.add_argument("--train-subset", type=int, default=None, metavar="N",
                       help="use a stratified random subset of N train images")
    group.add_argument("--labels-per-class", type=int, default=None, metavar="N",
                       help="labelled train images per class for probes and baselines")
    group.add_argument("--test-subset", type=int, default=None, metavar="N",
                       help="evaluate on a stratified random subset of N test images")
    group.add_argument("--pretrain-subset", type=int, default=None, metavar="N",
                       help="pre-train on a random subset of N images (STL-10: the seed "
                       "used 50000 of the unlabelled split)")


DESCRIPTION = """\
Run a grid of recipe variants, each over the same seeds and budget, and tabulate them.

Every recipe field is a flag taking ONE OR MORE values: one value sets it for every
variant, several span the grid, which is the product over all flags with several values.
A variant is named after its values for those flags only, in command-line order, e.g.
teacher_temp=0.02,out_dim=256 (tuple components joined by '_'). Tuple fields take their
arity per value, several values comma-joined: '--global-scale 0.4,1.0 0.25,1.0' (or plain
numbers grouped in order: '--global-scale 0.4 1.0 0.25 1.0'); booleans take true/false.
--compare-recipes adds named presets unchanged (only --profile, the budget and the data
options apply) as extra variants, to read a winner beside them.

Every (variant, seed) is a full 'dinobench run' into <out>/variants/<variant>/seed<N>/,
with its rows, train log and figures; by default without the costly extras (no linear
probe unless --probe, no label-budget comparison, no attention figure). The budget is
--budget-seconds of training (evaluation excluded) or --epochs (a recipe flag), the same
for every variant. The learning-rate and other schedules stay planned on the epochs,
which a time budget cuts short: give --epochs as many as the budget can hold.

The table (sweep.md, sweep.csv, sweep.json), per variant, over seeds: final validation
k-NN of the teacher (median, min-max), training seconds to reach each --knn-levels level
(median; a seed that never reaches it counts as slower than any and is counted), how many
seeds collapsed and why, images/s and training seconds; sorted by median k-NN. The
figure knn_vs_time.png draws k-NN against training seconds, a thin line per seed and a
bold median per variant.

Rerunning the same command continues a killed sweep: finished runs are reused, unfinished
ones resumed from their checkpoints. sweep.json records the grid and the command; a
different grid into the same --out is refused unless --restart.

example:
  dinobench sweep --datasets digits --recipe seed --teacher-temp 0.02 0.04 \\
      --out-dim 256 4096 --seeds 0 1 2 --budget-seconds 120 --compare-recipes official \\
      --out results/studies/teacher-temp
"""


def count_or_fraction(text: str) -> int | float:
    """``--val-size`` as run reads it: a whole number is a count, anything else a
    fraction (run checks the range)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--val-size takes a count (500) or a fraction (0.1), got {text!r}") from None


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("sweep", help="a recipe study: a grid of recipe variants "
                              "over seeds, one table and figure",
                              description=DESCRIPTION,
                              usage="dinobench sweep [options] [--RECIPE-FIELD VALUE "
                              "[VALUE ...] ...]",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["digits"], metavar="NAME",
                   help="datasets every variant runs on (default: digits)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small",
                   help="preset the grid's variants start from (default: small, as run)")
    p.add_argument("--compare-recipes", nargs="+", choices=sorted(RECIPES), default=[],
                   metavar="NAME", help="also run these presets unchanged, under the same "
                   f"budget and profile, as baselines (choices: {', '.join(sorted(RECIPES))})")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="run length preset, as for run (default: quick for digits, full "
                   "otherwise)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="N",
                   help="every variant runs each seed (default: 0)")
    p.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                   help="training seconds per run, evaluation excluded; the schedules stay "
                   "planned on --epochs, which the budget cuts short (default: none: the "
                   "epochs bound the run)")
    p.add_argument("--knn-levels", type=float, nargs="+", default=None, metavar="PCT",
                   help="validation k-NN levels (%%) for the time-to-k-NN columns (default: "
                   "the dataset's, e.g. digits " + " ".join(f"{lv:g}" for lv in
                                                            KNN_LEVELS["digits"])
                   + "); changing them re-tabulates without retraining")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="sweep folder (default: results/studies/<datasets>-<recipe>-<flags "
                   "that vary>)")
    p.add_argument("--restart", action="store_true",
                   help="discard what a previous sweep wrote in --out and start over")
    p.add_argument("--device", default=None, help="torch device (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile every run")
    add_precision_flag(p)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels in every run")
    p.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="checkpoint every N epochs in each run (default: 10)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev = p.add_argument_group("evaluation (passed to every run)")
    ev.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="k-NN every N epochs, the points of the time-to-k-NN and of the "
                    "figure (default: run's; 1 gives the finest)")
    ev.add_argument("--val-size", type=count_or_fraction, default=None, metavar="N|F",
                    help="validation subset held out of the train split's k-NN bank: a "
                    "count (500) or a fraction (0.1) (default: run's, 10%%, at most 5000)")
    ev.add_argument("--val-unseen", action="store_true",
                    help="hold the validation images out of pre-training too, as run's "
                    "flag (default: they stay in pre-training)")
    ev.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours (default: 20)")
    ev.add_argument("--knn-temperature", type=float, default=0.07,
                    help="k-NN vote temperature (default: 0.07)")
    ev.add_argument("--probe", action=argparse.BooleanOptionalAction, default=False,
                    help="fit the final linear probe in every run (default: off)")
    ev.add_argument("--n-last-blocks", type=int, default=1, metavar="N",
                    help="probe features: CLS tokens of the last N blocks (default: 1)")
    add_eval_feature_flag(ev)
    data = p.add_argument_group("data (passed to every run)")
    add_data_flags(data)
    add_grid_flags(p)
    return p
