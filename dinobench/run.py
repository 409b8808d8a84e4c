"""The main job: pre-train DINO on each dataset, evaluate it, write tables and figures.

``run(RunOptions(...))`` is what ``python -m dinobench run`` does. Each (dataset, seed)
unit gives long-format rows for the DINO teacher and for a randomly initialised ViT of
the same shape (the chance reference every score is read against). Units checkpoint as
they train; ``resume=True`` continues an interrupted run folder where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, checkpoint
from . import distributed as distrib
from .config import EVAL_FEATURES, PROFILES, Recipe, get_recipe, recipe_identity
from .curves import check_hold_out, hold_out_of_pretraining
from .data import COMPOSITES, SPECS, Dataset, DatasetSpec, known_datasets, load_dataset
from .data.subsets import validation_count
from .devices import default_device, resolve_device
from .dino.faults import knn_at_chance
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer, Interrupted, resolved_precision
from .errors import ConfigError, DataError, UserError
from .eval.supervised import SupervisedConfig
from .eval.time_to_accuracy import knn_levels
from .experiments import (
    BUDGETS,
    EvalConfig,
    dino_curve,
    dino_epoch_evaluator,
    evaluate_models,
    knn_metric,
    label_budget_comparison,
    merge_figures,
    random_init_like,
    training_rows,
    validation_split,
)
from .provenance import device_name, git_commit, machine, set_deterministic
from .report import write_results
from .runfolder import RunFolder
from .signals import StopOnSignal
from .vit import ViTConfig

DEFAULT_DATASETS = ("digits",)


@dataclass
class RunOptions:
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    recipe: str = "small"  # preset name: small | seed | official
    profile: str | None = None  # quick | full; None: quick for digits, full otherwise
    overrides: dict = field(default_factory=dict)  # recipe fields set on the command line
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str | None = None  # None: cuda when available, else cpu
    out: str | Path | None = None  # None: results/<run-name>
    compile: bool = False  # torch.compile the student and teacher
    precision: str = "auto"  # the step's autocast: auto (bf16 on CUDA, fp32 on a CPU), bf16, fp32
    knn_k: int = 20
    knn_temperature: float = 0.07
    attention_images: int = 16  # test images in the attention figure
    progress: bool = True  # tqdm bars
    # Evaluation beyond k-NN.
    probe: bool = True  # linear probe on the frozen teacher features
    n_last_blocks: int = 1  # probe features: CLS tokens of the last n blocks (DINO: 4)
    eval_feature: str = "cls"  # k-NN and probes: "cls" or "cls+patch-mean" (DINO's avgpool)
    eval_every: int | None = None  # k-NN every n epochs; None: the profile's; 0: off
    # Held out of the train split's k-NN bank to measure training on (never the test
    # split): a count, or a fraction in (0, 1); None: 10%, at most 5,000.
    val_size: int | float | None = None
    # Hold the validation images out of pre-training too, so the validation k-NN queries
    # images the model never trained on, as the test split's are (curves.py).
    val_unseen: bool = False
    # Stop training once this many seconds of it (evaluation excluded) have passed; the
    # schedules stay planned on the epochs, which the budget truncates. None: no budget.
    budget_seconds: float | None = None
    command: str | None = None  # as typed, for the results; None: this process's argv
    label_budgets: tuple[float, ...] | None = None  # labels vs no labels; None: profile's
    supervised_epochs: int | None = None  # None: the DINO epochs
    # Reliability.
    resume: bool = False  # continue the run folder's unfinished units
    restart: bool = False  # discard the run folder's unfinished units and start over
    checkpoint_every: int = 10  # epochs between checkpoints (and always at the end)
    deterministic: bool = False  # deterministic kernels: bit-identical reruns and resumes
    # Data selection, passed to load_dataset.
    data_dir: str | Path | None = None  # None: $DINOBENCH_DATA or the default cache folder
    download: bool = False  # let torchvision download missing datasets
    train_subset: int | None = None  # stratified, seeded subset of the train split
    labels_per_class: int | None = None  # labelled images per class for probes/baselines
    pretrain_subset: int | None = None  # random subset of the pre-training images
    test_subset: int | None = None  # stratified subset of the test split

    def data_kwargs(self) -> dict:
        return {"data_dir": self.data_dir, "download": self.download,
                "train_subset": self.train_subset, "labels_per_class": self.labels_per_class,
                "pretrain_subset": self.pretrain_subset, "test_subset": self.test_subset}

    def profile_name(self, dataset: str) -> str:
        return self.profile or ("quick" if dataset == "digits" else "full")


class RunInterrupted(UserError):
    """A signal stopped the run after its checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def resolve_recipe(opts: RunOptions, dataset: str, dataset_epochs: int) -> Recipe:
    """Preset, then profile, then command-line overrides; validated."""
    recipe = get_recipe(opts.recipe)
    profile_name = opts.profile_name(dataset)
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile {profile_name!r}; choose one of: "
                          f"{', '.join(PROFILES)}")
    changes = PROFILES[profile_name].changes_for(opts.recipe)
    changes.setdefault("epochs", dataset_epochs)
    changes.update(opts.overrides)
    try:
        return recipe.replace(**changes).for_dataset(SPECS[dataset].natural_images).validate()
    except TypeError as e:
        raise ConfigError(f"bad recipe override: {e}") from None


def vit_config(recipe: Recipe, spec: DatasetSpec) -> ViTConfig:
    return ViTConfig.for_recipe(recipe, recipe.image_size or spec.image_size,
                                recipe.grid or spec.grid, spec.channels)


def evaluation_config(opts: RunOptions) -> EvalConfig:
    # The headline (k, T) first, then the k 200 / T 0.1 setting of other published tables
    # (once, if the headline is that setting).
    knn = tuple(dict.fromkeys(((opts.knn_k, opts.knn_temperature), (200, 0.1))))
    return EvalConfig(knn=knn, probe=opts.probe,
                      n_last_blocks=opts.n_last_blocks,
                      patch_mean=opts.eval_feature == "cls+patch-mean",
                      attention_images=opts.attention_images)


def label_budgets(opts: RunOptions, dataset: str) -> tuple[float, ...]:
    """Fractions of the labelled split for labels versus no labels (none in the quick
    profile, where a supervised ViT per budget would not fit in minutes)."""
    if opts.label_budgets is not None:
        return tuple(opts.label_budgets)
    return () if opts.profile_name(dataset) == "quick" else BUDGETS


def eval_every(opts: RunOptions, dataset: str, epochs: int) -> int:
    if opts.eval_every is not None:
        return opts.eval_every
    # Time to accuracy is only as fine as the evaluations. In the quick profile one costs
    # under a tenth of an epoch (digits, one CPU core: 1.1 s of CPU time for the features
    # against 12.6 s of training per epoch), so every epoch; full runs evaluate 20 times.
    return 1 if opts.profile_name(dataset) == "quick" else max(1, epochs // 20)


def vit_identity(cfg: ViTConfig) -> dict:
    """The backbone as a resume identity: the stem only where it is not the patch
    embedding and the mask token only where there is one, so runs made before ``--stem``
    and ``--ibot-weight`` existed still resume."""
    vit = dataclasses.asdict(cfg)
    if vit["stem"] == "patch":
        del vit["stem"]
    if not vit["mask_token"]:
        del vit["mask_token"]
    return vit


def unit_identity(ds: Dataset, seed: int, opts: RunOptions, recipe: Recipe, cfg: ViTConfig,
                  info: distrib.DistInfo, device: torch.device) -> dict:
    """What a checkpoint must match to be resumed: the data, seed, recipe and model."""
    identity = {"dataset": ds.name, "n_images": int(ds.pretrain_images.shape[0]),
                "fingerprint": checkpoint.fingerprint(ds.pretrain_images), "seed": seed,
                "world_size": info.world_size, "device": device.type,
                "recipe": recipe_identity(recipe),
                "vit": vit_identity(cfg),
                # The records' validation k-NN must all come from one validation subset.
                "val_size": opts.val_size}
    if ds.train_images is not ds.pretrain_images and not opts.val_unseen:
        # The labelled split (k-NN bank, validation, probes) is not the pre-training
        # images (--labels-per-class, --pretrain-subset, STL-10's unlabelled split), so
        # their fingerprint does not pin it down.
        identity["labelled"] = [checkpoint.fingerprint(ds.train_images),
                                checkpoint.fingerprint(ds.train_labels)]
    identity["eval_every"] = eval_every(opts, ds.name, recipe.epochs)  # one cadence a curve
    if opts.val_unseen:  # (absent: the validation images pre-trained on, as before)
        identity["val_unseen"] = True
    if opts.eval_feature != "cls":  # and one feature (absent: CLS, as before the option)
        identity["eval_feature"] = opts.eval_feature
    if opts.precision != "auto":  # and one precision (absent: auto, as before the option)
        identity["precision"] = opts.precision
    return identity


def evaluation_identity(ds: Dataset, opts: RunOptions, recipe: Recipe) -> dict:
    """The evaluation settings and test images behind a finished unit's rows."""
    return {"test_fingerprint": checkpoint.fingerprint(ds.test_images),
            "knn": [opts.knn_k, opts.knn_temperature], "probe": opts.probe,
            "n_last_blocks": opts.n_last_blocks,
            "label_budgets": list(label_budgets(opts, ds.name)),
            "supervised_epochs": opts.supervised_epochs or recipe.epochs}


# Entered the identity together; a saved identity without "eval_every" was written
# before, and is compared without them, so that its run still resumes.
SINCE_EVAL_EVERY = ("eval_every", "labelled")


def comparable(saved: dict, current: dict) -> dict:
    """``current`` as an identity of ``saved``'s vintage would record it."""
    if "eval_every" in saved:
        return current
    return {k: v for k, v in current.items() if k not in SINCE_EVAL_EVERY}


def finished_budget(done: dict) -> float | None:
    """The ``--budget-seconds`` a finished unit's rows were made under (None: none)."""
    return next((r["budget_seconds"] for r in done["rows"] if "budget_seconds" in r), None)


def describe_budget(seconds: float | None) -> str:
    return "no time budget" if seconds is None else f"--budget-seconds {seconds:g}"


UNKNOWN = object()  # the budget of a checkpoint written before checkpoints recorded it


def check_budget_covers(path, trained: float, budget: float | None,
                        ran_under: float | None | object) -> None:
    """Refuse a resume whose budget is under the ``trained`` seconds the saved state has
    had under another budget (``ran_under``): its rows would claim a budget the model
    trained past. Under the same budget the run goes on as it would have (the cut comes
    at the first step after the budget, so the seconds can pass it by a step)."""
    if (budget is None or trained <= budget or ran_under is UNKNOWN
            or ran_under == budget):
        return
    raise checkpoint.CheckpointError(
        f"cannot resume from {path}: it has trained {trained:.1f} s under "
        f"{describe_budget(ran_under)}, more than --budget-seconds {budget:g}; resume with "
        f"--budget-seconds {math.ceil(trained)} or more, or start over with --restart")


def run_unit(ds: Dataset, seed: int, opts: RunOptions, folder: RunFolder, device: torch.device,
             info: distrib.DistInfo, stop: StopOnSignal, log: Callable[[str], None]) -> dict:
    """Train and evaluate one (dataset, seed); returns ``{"rows": [...], "figure": ...}``."""
    recipe = resolve_recipe(opts, ds.name, ds.spec.epochs)
    cfg = vit_config(recipe, ds.spec)
    identity = unit_identity(ds, seed, opts, recipe, cfg, info, device)
    # A finished unit's rows also depend on how it was evaluated. As its JSON reads back
    # (tuples as lists), to compare with the saved one.
    finished = json.loads(json.dumps(
        {**identity, "evaluation": evaluation_identity(ds, opts, recipe)}))
    ckpt_path = folder.checkpoint(ds.name, seed)
    before = UNKNOWN  # the budget of the finished unit's rows, where there are some
    if opts.resume:
        done = folder.load_done(ds.name, seed)
        if done is not None:
            path = folder.done(ds.name, seed)
            if "identity" not in done:
                raise checkpoint.CheckpointError(
                    f"{path} holds rows without the configuration that made them; start "
                    "over with --restart")
            checkpoint.check_identity(path, done["identity"],
                                      comparable(done["identity"], finished))
            before = finished_budget(done)
            if before == opts.budget_seconds:
                log(f"[{ds.name}] seed {seed}: finished earlier, rows reused")
                return done
            # Another budget: its rows are not this run's. Training continues from the
            # final checkpoint (which the budget check below holds to what it allows).
            if not ckpt_path.exists():
                raise checkpoint.CheckpointError(
                    f"cannot resume from {path}: its rows were made under "
                    f"{describe_budget(before)}, this run asks for "
                    f"{describe_budget(opts.budget_seconds)}, and its checkpoint "
                    f"{ckpt_path} is gone; rerun with the same --budget-seconds, or start "
                    "over with --restart")
            log(f"[{ds.name}] seed {seed}: finished earlier under "
                f"{describe_budget(before)}; continuing from its checkpoint under "
                f"{describe_budget(opts.budget_seconds)}")
            # Its rows are no longer the checkpoint's: an interrupted continuation must
            # not find them. Every rank has read them before the main one removes them.
            distrib.barrier()
            if info.is_main:
                path.unlink()
    crop_cfg = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size,
                                           ds.spec.mean, ds.spec.std)
    every = eval_every(opts, ds.name, recipe.epochs)
    val = validation_split(ds, opts.val_size)
    on_epoch_end = (dino_epoch_evaluator(ds, every=every, epochs=recipe.epochs, val=val,
                                         cfg=evaluation_config(opts), device=device,
                                         k=opts.knn_k, temperature=opts.knn_temperature)
                    if every else None)
    if opts.compile:  # units would share Dynamo's per-function cache up to its limit
        from .compiling import fresh_compile_state

        fresh_compile_state(log)
    trainer = DINOTrainer(recipe, cfg, crop_cfg, device=device, seed=seed,
                          compile=opts.compile, log_path=folder.train_log(ds.name, seed),
                          progress=opts.progress, log=log, dist=info,
                          on_epoch_end=on_epoch_end, precision=opts.precision)
    if opts.resume and ckpt_path.exists():
        saved = checkpoint.load(ckpt_path)
        checkpoint.check_identity(ckpt_path, saved["identity"],
                                  comparable(saved["identity"], identity))
        trainer.load_state_dict(saved["trainer"])
        check_budget_covers(ckpt_path, trainer.train_seconds, opts.budget_seconds,
                            saved["trainer"].get("budget_seconds", before))
        log(f"[{ds.name}] seed {seed}: resuming at epoch {trainer.epoch + 1}, "
            f"step {trainer.step_count} from {ckpt_path}")

    def save(tr: DINOTrainer) -> None:
        state = tr.state_dict()  # collective under torchrun: every rank calls it
        if info.is_main:  # with the budget it trained under, for a resume to compare
            checkpoint.save(ckpt_path, identity,
                            {**state, "budget_seconds": opts.budget_seconds})

    try:
        result = trainer.fit(ds.pretrain_images, checkpoint=save,
                             checkpoint_every=opts.checkpoint_every,
                             should_stop=stop.requested, max_seconds=opts.budget_seconds)
    except Interrupted as e:  # every rank is here, at the same step
        signum = distrib.signal_over_ranks(stop.signum)
        raise RunInterrupted(f"{e} by signal {signum}; checkpoint saved to {ckpt_path}; "
                             "continue with the same command plus --resume", signum) from None

    model = f"dino-{recipe.name}"
    context = {"recipe": recipe.name, "profile": opts.profile_name(ds.name),
               "epochs": recipe.epochs, "n_train": int(ds.pretrain_images.shape[0]),
               "n_test": int(ds.test_images.shape[0]), "device": device_name(device),
               "image_size": cfg.image_size, "grid": cfg.grid}
    if ds.name in COMPOSITES:
        context["background"] = ds.name.split("-")[1]
    if opts.budget_seconds is not None:  # say where the budget cut the planned epochs
        context.update(budget_seconds=opts.budget_seconds, budget_stop=result.budget_stop,
                       epochs_done=round(trainer.step_count / trainer.steps_per_epoch(
                           int(ds.pretrain_images.shape[0])), 3))
    eval_cfg = evaluation_config(opts)
    models = {model: result.teacher.backbone,
              "random-init": random_init_like(cfg, seed, device)}
    rows, figures = [], {"curves": [dino_curve(ds.name, model, result.history, seed)]}
    budgets = label_budgets(opts, ds.name)
    if budgets:
        # The same optimisation budget as DINO: as many image draws per epoch, the same
        # batch, peak learning rate, warm-up and stochastic depth.
        sup_cfg = SupervisedConfig(epochs=opts.supervised_epochs or recipe.epochs,
                                   images_per_epoch=int(ds.pretrain_images.shape[0]),
                                   batch_size=recipe.batch_size, lr=recipe.lr,
                                   warmup_epochs=recipe.warmup_epochs,
                                   drop_path=recipe.drop_path)
        b_rows, b_figures, supervised = label_budget_comparison(
            ds, result.teacher.backbone, model=model, crop_cfg=crop_cfg, seed=seed,
            context=context, budgets=budgets, sup_cfg=sup_cfg, cfg=eval_cfg, device=device,
            log=None)
        rows += b_rows
        figures = merge_figures(figures, b_figures)
        models["supervised"] = supervised
    e_rows, e_figures = evaluate_models(ds, models, seed=seed, context=context, cfg=eval_cfg,
                                        val=val, attention=seed == opts.seeds[0],
                                        device=device)
    rows = e_rows + training_rows(ds.name, model, result.history, context=context, seed=seed,
                                  levels=knn_levels(ds.name) if every else None) + rows
    figures = merge_figures(figures, e_figures)

    headline = knn_metric(opts.knn_k, opts.knn_temperature)
    knn = next(r["value"] for r in rows if r["model"] == model and r["metric"] == headline)
    # Judged on the validation split where there is one: a flag drops the seed from the
    # means, a selection the test split must not make.
    judged = next((r["value"] for r in rows if r["model"] == model
                   and r["metric"] == "val_knn_top1"), None)
    split, judged = ("validation", judged) if judged is not None else ("test", knn)
    collapsed = result.collapsed or (
        f"{split} k-NN top-1 {judged:.2f}% is at chance" if knn_at_chance(
            judged, ds.spec.num_classes) else None)
    for r in rows:
        r["collapsed"] = bool(collapsed) and r["model"] == model
        r["collapse_reason"] = (collapsed or "") if r["model"] == model else ""
    train_seconds = round(result.history[-1]["train_seconds"], 3)
    for r in rows:
        if r["model"] == model and r["metric"] == headline:
            r["train_seconds"] = train_seconds
    if collapsed:
        log(f"[{ds.name}] seed {seed}: WARNING collapsed: {collapsed}")
    random_knn = next(r["value"] for r in rows
                      if r["model"] == "random-init" and r["metric"] == headline)
    log(f"[{ds.name}] seed {seed}: k-NN top-1 {knn:.2f}% (DINO teacher) vs "
        f"{random_knn:.2f}% (random init); trained in {train_seconds:.1f} s")
    unit = {"rows": rows, "figures": figures, "recipe": dataclasses.asdict(recipe),
            "identity": finished}
    if info.is_main:
        folder.save_done(ds.name, seed, unit)
    return unit


def check_options(opts: RunOptions) -> None:
    """Fail on a bad dataset name or option before any data is loaded or trained."""
    if not opts.datasets:
        raise ConfigError("--datasets needs at least one name")
    if not opts.seeds:
        raise ConfigError("--seeds needs at least one seed")
    if any(seed < 0 for seed in opts.seeds) or len(set(opts.seeds)) != len(opts.seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got "
                          f"{' '.join(map(str, opts.seeds))}")
    resolve_device(opts.device)
    if opts.resume and opts.restart:
        raise ConfigError("--resume and --restart contradict each other; pick one")
    if opts.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must not be negative, got "
                          f"{opts.checkpoint_every}")
    if opts.budget_seconds is not None and not 0 < opts.budget_seconds < float("inf"):
        raise ConfigError(f"--budget-seconds must be a positive number of seconds, got "
                          f"{opts.budget_seconds}")
    validation_count(1, opts.val_size)  # its type and range, before any data is loaded
    resolved_precision(opts.precision, torch.device("cpu"))  # a clear error for a bad name
    if opts.eval_feature not in EVAL_FEATURES:
        raise ConfigError(f"--eval-feature {opts.eval_feature!r} is not one of: "
                          f"{', '.join(EVAL_FEATURES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    for name in opts.datasets:
        if name not in SPECS:
            raise DataError(f"unknown dataset {name!r}; known datasets: "
                            f"{', '.join(known_datasets())}")
        recipe = resolve_recipe(opts, name, SPECS[name].epochs)
        vit_config(recipe, SPECS[name])
        if recipe.batch_size % world or recipe.batch_size // world < 2:
            raise ConfigError(f"--batch-size {recipe.batch_size} must be a multiple of the "
                              f"{world} processes, with at least 2 images per process")
        if not 1 <= opts.n_last_blocks <= recipe.depth:
            raise ConfigError(f"--n-last-blocks {opts.n_last_blocks} must lie in [1, "
                              f"--depth {recipe.depth}]")


def check_data(opts: RunOptions, datasets: list[Dataset]) -> None:
    """Checks that need the loaded data, still before anything is written."""
    for ds in datasets:
        recipe = resolve_recipe(opts, ds.name, ds.spec.epochs)
        val, _ = validation_split(ds, opts.val_size)  # a hold-out it cannot give fails here
        n, held = ds.pretrain_images.shape[0], ""
        if opts.val_unseen:
            check_hold_out(ds)
            n, held = n - len(val), " left by --val-unseen"
        if n < recipe.batch_size:
            raise ConfigError(f"--batch-size {recipe.batch_size} exceeds the {n:,} "
                              f"pre-training images of {ds.name}{held}; lower --batch-size")


def default_out(opts: RunOptions) -> Path:
    profile = opts.profile or ("quick" if list(opts.datasets) == ["digits"] else "full")
    return Path("results") / f"{'-'.join(opts.datasets)}-{opts.recipe}-{profile}"


def _prepare_folder(folder: RunFolder, opts: RunOptions) -> None:
    folder.remove_stale_temporaries()
    unfinished = folder.unfinished()
    if opts.restart or not opts.resume:
        if unfinished and not opts.restart:
            names = ", ".join(p.stem for p in unfinished[:3])
            raise UserError(f"{folder.path} holds an unfinished run ({names}); continue it "
                            "with --resume, or discard it with --restart")
        folder.clear()


def run(opts: RunOptions | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate on every dataset in ``opts``; write the run folder; return rows."""
    opts = opts or RunOptions()
    check_options(opts)
    info, device_str = distrib.init(opts.device)
    device = torch.device(device_str or default_device())
    if not info.is_main:
        log = lambda msg: None  # noqa: E731 (only rank 0 speaks)
    if opts.deterministic:
        set_deterministic()
    folder = RunFolder(Path(opts.out) if opts.out else default_out(opts))
    datasets = [load_dataset(name, **opts.data_kwargs()) for name in opts.datasets]
    check_data(opts, datasets)
    if opts.val_unseen:
        datasets = [hold_out_of_pretraining(ds, validation_split(ds, opts.val_size)[0])
                    for ds in datasets]
    t0 = time.perf_counter()
    # The commit whose code this process runs: read now, since a long run can end after
    # the checkout has moved on.
    commit = git_commit()
    rows, figures, recipes = [], {}, {}
    with folder if info.is_main else contextlib.nullcontext(), StopOnSignal() as stop:
        if info.is_main:
            _prepare_folder(folder, opts)
        distrib.barrier()
        for ds in datasets:
            log(f"[{ds.name}] {ds.pretrain_images.shape[0]:,} pre-training images, "
                f"{ds.test_images.shape[0]:,} test, on {device}")
            for seed in opts.seeds:
                # A signal that came during evaluation, to any rank: all stop here.
                if distrib.any_rank(stop.requested()):
                    signum = distrib.signal_over_ranks(stop.signum)
                    raise RunInterrupted(f"stopped by signal {signum} before "
                                         f"{ds.name} seed {seed}; continue with the same "
                                         "command plus --resume", signum)
                unit = run_unit(ds, seed, opts, folder, device, info, stop, log)
                rows += unit["rows"]
                recipes[ds.name] = unit["recipe"]
                figures = merge_figures(figures, unit["figures"])
        if not info.is_main:
            distrib.shutdown()
            return rows
        meta = {
            "command": opts.command or shlex.join(["dinobench", *sys.argv[1:]]),
            "datasets": list(opts.datasets),
            "recipes": recipes, "seeds": list(opts.seeds), "git_commit": commit,
            "versions": {"dinobench": __version__, "python": platform.python_version(),
                         "torch": torch.__version__},
            "machine": machine(), "threads": torch.get_num_threads(),
            "world_size": info.world_size, "deterministic": opts.deterministic,
            "eval_feature": opts.eval_feature,
            # Whether the validation images were held out of pre-training (--val-unseen).
            "val_unseen": opts.val_unseen,
            "precision": resolved_precision(opts.precision, device),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        md = write_results(folder.path, rows, meta, figures)
    distrib.shutdown()
    log(f"\n{md}\nwrote {folder.path}/results.{{json,csv,md}} and figures")
    return rows
