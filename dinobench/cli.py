"""Command line: ``python -m dinobench {run,report,bench,sweep} ...``.

Bad input never shows a traceback: argparse errors and :class:`UserError` print one line
naming the problem and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from .bench import add_bench_parser, run_bench
from .config import (
    AUTO_FIELDS,
    CHOICES,
    PROFILES,
    RECIPES,
    defaults_text,
    recipe_fields,
)
from .errors import UserError
from .sweep import add_sweep_parser, run_sweep
from .sweep_cli import (
    add_data_flags,
    add_eval_feature_flag,
    add_precision_flag,
    count_or_fraction,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def float_or_auto(text: str) -> float | None:
    """A probability, or 'auto' (None): decided per dataset by Recipe.for_dataset."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _recipe_flag_type(f: dataclasses.Field):
    """argparse settings for a recipe field, from its annotation."""
    t = str(f.type)
    if t.startswith("tuple"):
        return {"type": float, "nargs": t.count("float"), "metavar": "X"}
    if t == "bool":
        return {"action": argparse.BooleanOptionalAction}
    base = t.split(" |")[0]
    if f.name in CHOICES:
        return {"choices": list(CHOICES[f.name])}
    if f.name in AUTO_FIELDS:
        return {"type": float_or_auto, "metavar": "P|auto"}
    return {"type": {"int": int, "float": float, "str": str}[base], "metavar": base.upper()}


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "recipe fields", "override any field of the chosen recipe; defaults shown as "
        "seed / official / small, then what the quick profile (the default for digits) "
        "uses with seed and official")
    for f in recipe_fields():
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"recipe.{f.name}",
                           default=None,
                           help=f"{f.metadata['help']} (default: {defaults_text(f)})",
                           **_recipe_flag_type(f))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinobench", allow_abbrev=False,
                     description="DINO self-supervised training on small images, measured: "
                     "k-NN accuracy, attention maps, chance references.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub._parser_class = lambda **kw: _Parser(allow_abbrev=False, **kw)  # no prefix matching

    run = sub.add_parser("run", help="train DINO on datasets, evaluate, write results",
                         description="Pre-train DINO on each dataset, evaluate the teacher "
                         "beside a randomly initialised ViT of the same shape, and write "
                         "results.{json,csv,md} and figures to the run folder. With no "
                         "--datasets it runs the embedded scikit-learn digits with the quick "
                         "profile (minutes on a CPU, no download).")
    run.add_argument("--datasets", nargs="+", default=["digits"], metavar="NAME",
                     help="datasets to run, in order (default: digits)")
    run.add_argument("--recipe", choices=sorted(RECIPES), default="small",
                     help="training recipe preset (default: small, the one that learns "
                     "in CPU minutes; seed and official are the study's and the paper's)")
    run.add_argument("--profile", choices=sorted(PROFILES), default=None,
                     help="run length preset: "
                     + "; ".join(f"{p.name}: {p.note}" for p in PROFILES.values())
                     + " (default: quick for digits, full otherwise)")
    run.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="N",
                     help="random seeds; tables report mean and standard deviation "
                     "(default: 0)")
    run.add_argument("--device", default=None,
                     help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                     "available, else cpu)")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="run folder (default: results/<datasets>-<recipe>-<profile>)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the student and teacher (static shapes)")
    add_precision_flag(run)
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--budget-seconds", type=float, default=None, metavar="S",
                     help="stop training after S seconds of it (evaluations excluded), then "
                     "evaluate as usual; the schedules stay planned on --epochs, which the "
                     "budget truncates, so choose --epochs to match (default: no budget)")
    rel = run.add_argument_group("checkpoints and resume")
    rel.add_argument("--resume", action="store_true",
                     help="continue the run folder's interrupted run where it stopped "
                     "(same flags and data required)")
    rel.add_argument("--restart", action="store_true",
                     help="discard an interrupted run in the run folder and start over")
    rel.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                     help="save a checkpoint every N epochs (also at the end and on "
                     "SIGINT/SIGTERM; 0: only then) (default: 10)")
    rel.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels, so a rerun or a resumed run is "
                     "bit-identical on the same machine (slower on GPU)")
    ev = run.add_argument_group("evaluation")
    ev.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours (default: 20; "
                    "k 200, T 0.1 is always reported too)")
    ev.add_argument("--knn-temperature", type=float, default=0.07,
                    help="k-NN vote temperature (default: 0.07)")
    ev.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                    help="fit a linear probe on the frozen teacher features (default: on)")
    ev.add_argument("--n-last-blocks", type=int, default=1, metavar="N",
                    help="probe features: CLS tokens of the last N blocks (DINO uses 4; "
                    "default: 1)")
    add_eval_feature_flag(ev)
    ev.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="validation k-NN of the teacher every N epochs, for the learning "
                    "curve and time to accuracy; 0: off (default: 1 in the quick profile, "
                    "epochs/20 otherwise)")
    ev.add_argument("--val-size", type=count_or_fraction, default=None, metavar="N|F",
                    help="validation subset held out of the train split's k-NN bank, on "
                    "which training is measured (never the test split): a count (500) or "
                    "a fraction (0.1); stratified, at least one image per class (default: "
                    "10%%, at most 5000)")
    ev.add_argument("--val-unseen", action="store_true",
                    help="hold the validation images out of pre-training too, so the "
                    "validation k-NN queries images the model never trained on, as the test "
                    "split's are (default: they stay in pre-training, labels unseen, which "
                    "reads higher; docs/metrics.md)")
    ev.add_argument("--label-budgets", type=float, nargs="*", default=None, metavar="F",
                    help="labels versus no labels: fractions of the labelled split for the "
                    "linear probe and for a ViT trained from scratch with labels; give no "
                    "value to turn off (default: 0.01 0.1 1.0; off in the quick profile)")
    ev.add_argument("--supervised-epochs", type=int, default=None, metavar="N",
                    help="epochs of the supervised baseline, each drawing as many images "
                    "as a DINO epoch, with the recipe's batch, learning rate, warm-up and "
                    "drop path (default: the DINO epochs)")
    ev.add_argument("--composites", action="store_true",
                    help="also run the background x resolution benchmark: MNIST digits on "
                    "none/cifar10/natural backgrounds at 32/64/96 px (datasets "
                    "mnist-<background>-<size>; needs mnist.npz, and cifar10.npz for "
                    "CIFAR-10 backgrounds, in --data-dir)")
    data = run.add_argument_group("data")
    add_data_flags(data)
    _add_recipe_flags(run)

    report = sub.add_parser("report", help="rebuild tables and figures from results.json",
                            description="Re-create results.md, results.csv and the figures "
                            "of a run folder from its results.json, without training.")
    report.add_argument("run_dir", metavar="DIR", help="a folder written by 'dinobench run'")
    report.add_argument("--index", action="store_true",
                        help="instead, write DIR/README.md: one summary table across every "
                        "run folder under DIR")
    add_bench_parser(sub)
    add_sweep_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> None:
    from .data import COMPOSITES
    from .run import RunOptions, run

    overrides = {k.split(".", 1)[1]: (tuple(v) if isinstance(v, list) else v)
                 for k, v in vars(args).items() if k.startswith("recipe.") and v is not None}
    if args.knn_k < 1:
        raise UserError(f"--knn-k must be at least 1, got {args.knn_k}")
    if not args.knn_temperature > 0:
        raise UserError(f"--knn-temperature must be positive, got {args.knn_temperature}")
    if args.n_last_blocks < 1:
        raise UserError(f"--n-last-blocks must be at least 1, got {args.n_last_blocks}")
    if args.eval_every is not None and args.eval_every < 0:
        raise UserError(f"--eval-every must not be negative, got {args.eval_every}")
    if args.label_budgets and not all(0 < f <= 1 for f in args.label_budgets):
        raise UserError(f"--label-budgets are fractions in (0, 1], got {args.label_budgets}")
    if args.supervised_epochs is not None and args.supervised_epochs < 1:
        raise UserError(f"--supervised-epochs must be at least 1, got "
                        f"{args.supervised_epochs}")
    datasets = list(args.datasets)
    if args.composites:
        datasets += [name for name in COMPOSITES if name not in datasets]
    run(RunOptions(datasets=datasets, recipe=args.recipe, profile=args.profile,
                   overrides=overrides, seeds=args.seeds, device=args.device, out=args.out,
                   compile=args.compile, precision=args.precision, knn_k=args.knn_k,
                   knn_temperature=args.knn_temperature, progress=not args.no_progress,
                   data_dir=args.data_dir, download=args.download,
                   train_subset=args.train_subset, labels_per_class=args.labels_per_class,
                   pretrain_subset=args.pretrain_subset, resume=args.resume,
                   restart=args.restart, checkpoint_every=args.checkpoint_every,
                   deterministic=args.deterministic, probe=args.probe,
                   n_last_blocks=args.n_last_blocks, eval_feature=args.eval_feature,
                   eval_every=args.eval_every,
                   label_budgets=(tuple(args.label_budgets)
                                  if args.label_budgets is not None else None),
                   supervised_epochs=args.supervised_epochs, test_subset=args.test_subset,
                   val_size=args.val_size, val_unseen=args.val_unseen,
                   budget_seconds=args.budget_seconds,
                   command=getattr(args, "typed", None)))


def _bench(args: argparse.Namespace) -> None:
    run_bench(args)


def _report(args: argparse.Namespace) -> None:
    from .report import rebuild, write_index

    print((write_index if args.index else rebuild)(args.run_dir), end="")


def main(argv: list[str] | None = None) -> int:
    from .dino.faults import TrainingError
    from .run import RunInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.typed = shlex.join(["dinobench", *argv])  # recorded in the results as typed
    try:
        {"run": _run, "report": _report, "bench": _bench,
         "sweep": run_sweep}[args.command](args)
    except RunInterrupted as e:
        print(f"dinobench {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        print(f"dinobench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"dinobench {args.command}: training failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dinobench: interrupted", file=sys.stderr)
        return 130
    return 0
