"""The main job: pre-train DINO on each dataset, evaluate it, write tables and figures.

``run(RunOptions(...))`` is what ``python -m dinobench run`` does. Each (dataset, seed)
unit gives long-format rows for the DINO teacher and for a randomly initialised ViT of
the same shape (the chance reference every score is read against). Units checkpoint as
they train; ``resume=True`` continues an interrupted run folder where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, checkpoint
from . import distributed as distrib
from .config import PROFILES, Recipe, get_recipe
from .data import SPECS, Dataset, DatasetSpec, known_datasets, load_dataset
from .dino.faults import knn_at_chance
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer, Interrupted
from .errors import ConfigError, DataError, UserError
from .eval.features import extract_features, to_model_input
from .eval.knn import knn_top1
from .report import write_results
from .runfolder import RunFolder
from .signals import StopOnSignal
from .vit import ViT, ViTConfig

DEFAULT_DATASETS = ("digits",)


@dataclass
class RunOptions:
    datasets: list[str] = field(default_factory=lambda: list(DEFAULT_DATASETS))
    recipe: str = "seed"  # preset name: seed | official
    profile: str | None = None  # quick | full; None: quick for digits, full otherwise
    overrides: dict = field(default_factory=dict)  # recipe fields set on the command line
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str | None = None  # None: cuda when available, else cpu
    out: str | Path | None = None  # None: results/<run-name>
    compile: bool = False  # torch.compile the student and teacher
    knn_k: int = 20
    knn_temperature: float = 0.07
    attention_images: int = 16  # test images in the attention figure
    progress: bool = True  # tqdm bars
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

    def data_kwargs(self) -> dict:
        return {"data_dir": self.data_dir, "download": self.download,
                "train_subset": self.train_subset, "labels_per_class": self.labels_per_class,
                "pretrain_subset": self.pretrain_subset}


class RunInterrupted(UserError):
    """A signal stopped the run after its checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def resolve_recipe(opts: RunOptions, dataset: str, dataset_epochs: int) -> Recipe:
    """Preset, then profile, then command-line overrides; validated."""
    recipe = get_recipe(opts.recipe)
    profile_name = opts.profile or ("quick" if dataset == "digits" else "full")
    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile {profile_name!r}; choose one of: "
                          f"{', '.join(PROFILES)}")
    changes = dict(PROFILES[profile_name].changes)
    changes.setdefault("epochs", dataset_epochs)
    changes.update(opts.overrides)
    try:
        return recipe.replace(**changes).validate()
    except TypeError as e:
        raise ConfigError(f"bad recipe override: {e}") from None


def vit_config(recipe: Recipe, spec: DatasetSpec) -> ViTConfig:
    return ViTConfig(image_size=recipe.image_size or spec.image_size,
                     grid=recipe.grid or spec.grid, in_chans=spec.channels,
                     dim=recipe.dim, depth=recipe.depth, heads=recipe.heads,
                     mlp_dim=recipe.mlp_dim)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def set_deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def attention_maps(backbone: ViT, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Last block, CLS query, mean over heads: ``(N, gh, gw)`` float32 on the CPU."""
    backbone.eval()
    device = next(backbone.parameters()).device
    x = to_model_input(images.to(device), mean, std, backbone.cfg.image_size)
    return backbone.cls_attention(x).mean(dim=1).float().cpu()


def features(backbone: ViT, images: torch.Tensor, spec: DatasetSpec,
             info: distrib.DistInfo) -> torch.Tensor:
    """CLS features of all images; with several processes each extracts a contiguous
    slice and the slices are gathered in order."""
    if info.enabled:
        per = math.ceil(images.shape[0] / info.world_size)
        images = images[info.rank * per:(info.rank + 1) * per]
    return distrib.all_gather_cat(extract_features(backbone, images, spec.mean, spec.std))


def evaluate_knn(backbone: ViT, ds: Dataset, opts: RunOptions,
                 info: distrib.DistInfo = distrib.SINGLE) -> float:
    train = features(backbone, ds.train_images, ds.spec, info)
    test = features(backbone, ds.test_images, ds.spec, info)
    return knn_top1(train, ds.train_labels, test, ds.test_labels, k=opts.knn_k,
                    temperature=opts.knn_temperature, num_classes=ds.spec.num_classes)


def run_unit(ds: Dataset, seed: int, opts: RunOptions, folder: RunFolder, device: torch.device,
             info: distrib.DistInfo, stop: StopOnSignal, log: Callable[[str], None]) -> dict:
    """Train and evaluate one (dataset, seed); returns ``{"rows": [...], "figure": ...}``."""
    if opts.resume:
        done = folder.load_done(ds.name, seed)
        if done is not None:
            log(f"[{ds.name}] seed {seed}: finished earlier, rows reused")
            return done
    recipe = resolve_recipe(opts, ds.name, ds.spec.epochs)
    cfg = vit_config(recipe, ds.spec)
    crop_cfg = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size,
                                           ds.spec.mean, ds.spec.std)
    trainer = DINOTrainer(recipe, cfg, crop_cfg, device=device, seed=seed,
                          compile=opts.compile, log_path=folder.train_log(ds.name, seed),
                          progress=opts.progress, log=log, dist=info)
    identity = {"dataset": ds.name, "n_images": int(ds.pretrain_images.shape[0]),
                "fingerprint": checkpoint.fingerprint(ds.pretrain_images), "seed": seed,
                "world_size": info.world_size, "recipe": dataclasses.asdict(recipe),
                "vit": dataclasses.asdict(cfg)}
    ckpt_path = folder.checkpoint(ds.name, seed)
    if opts.resume and ckpt_path.exists():
        saved = checkpoint.load(ckpt_path)
        checkpoint.check_identity(ckpt_path, saved["identity"], identity)
        trainer.load_state_dict(saved["trainer"])
        log(f"[{ds.name}] seed {seed}: resuming at epoch {trainer.epoch + 1}, "
            f"step {trainer.step_count} from {ckpt_path}")

    def save(tr: DINOTrainer) -> None:
        if info.is_main:
            checkpoint.save(ckpt_path, identity, tr.state_dict())

    try:
        result = trainer.fit(ds.pretrain_images, checkpoint=save,
                             checkpoint_every=opts.checkpoint_every,
                             should_stop=stop.requested)
    except Interrupted as e:
        raise RunInterrupted(f"{e} by signal {stop.signum}; checkpoint saved to {ckpt_path}; "
                             "continue with the same command plus --resume",
                             stop.signum) from None

    dino_knn = evaluate_knn(result.teacher.backbone, ds, opts, info)
    torch.manual_seed(seed)
    random_vit = ViT(cfg).to(device)  # same shape, same seed, never trained
    t0 = time.perf_counter()
    random_knn = evaluate_knn(random_vit, ds, opts, info)
    eval_seconds = time.perf_counter() - t0
    collapsed = result.collapsed or (
        f"k-NN top-1 {dino_knn:.2f}% is at chance" if knn_at_chance(
            dino_knn, ds.spec.num_classes) else None)
    if collapsed:
        log(f"[{ds.name}] seed {seed}: WARNING collapsed: {collapsed}")
    log(f"[{ds.name}] seed {seed}: k-NN top-1 {dino_knn:.2f}% (DINO teacher) vs "
        f"{random_knn:.2f}% (random init)")
    context = {"recipe": recipe.name, "epochs": recipe.epochs,
               "n_train": int(ds.pretrain_images.shape[0]),
               "n_test": int(ds.test_images.shape[0]), "device": device_name(device),
               "image_size": cfg.image_size, "grid": cfg.grid, "seed": seed,
               "k": opts.knn_k, "temperature": opts.knn_temperature}
    train_seconds = sum(h["seconds"] for h in result.history)
    rows = [
        {"dataset": ds.name, "model": f"dino-{recipe.name}", "metric": "knn_top1",
         "value": dino_knn, **context, "seconds": round(train_seconds, 3),
         "collapsed": bool(collapsed), "collapse_reason": collapsed or ""},
        {"dataset": ds.name, "model": "random-init", "metric": "knn_top1",
         "value": random_knn, **context, "seconds": round(eval_seconds, 3),
         "collapsed": False, "collapse_reason": ""},
    ]
    figure = None
    if opts.attention_images > 0 and seed == opts.seeds[0]:
        imgs = ds.test_images[:opts.attention_images]
        maps = attention_maps(result.teacher.backbone, imgs, ds.spec.mean, ds.spec.std)
        figure = {"dataset": ds.name, "model": f"dino-{recipe.name}",
                  "images": imgs.permute(0, 2, 3, 1).tolist(),
                  "maps": [[[round(v, 5) for v in r] for r in m] for m in maps.tolist()]}
    unit = {"rows": rows, "figure": figure, "recipe": dataclasses.asdict(recipe)}
    if info.is_main:
        folder.save_done(ds.name, seed, unit)
    return unit


def check_options(opts: RunOptions) -> None:
    """Fail on a bad dataset name or option before any data is loaded or trained."""
    if not opts.datasets:
        raise ConfigError("--datasets needs at least one name")
    if not opts.seeds:
        raise ConfigError("--seeds needs at least one seed")
    if opts.resume and opts.restart:
        raise ConfigError("--resume and --restart contradict each other; pick one")
    if opts.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must not be negative, got "
                          f"{opts.checkpoint_every}")
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
    t0 = time.perf_counter()
    rows, figures, recipes = [], [], {}
    with folder if info.is_main else contextlib.nullcontext(), StopOnSignal() as stop:
        if info.is_main:
            _prepare_folder(folder, opts)
        distrib.barrier()
        for ds in datasets:
            log(f"[{ds.name}] {ds.pretrain_images.shape[0]:,} pre-training images, "
                f"{ds.test_images.shape[0]:,} test, on {device}")
            for seed in opts.seeds:
                unit = run_unit(ds, seed, opts, folder, device, info, stop, log)
                rows += unit["rows"]
                recipes[ds.name] = unit["recipe"]
                if unit.get("figure"):
                    figures.append(unit["figure"])
        if not info.is_main:
            return rows
        meta = {
            "command": " ".join(sys.argv), "datasets": list(opts.datasets),
            "recipes": recipes, "seeds": list(opts.seeds), "git_commit": git_commit(),
            "versions": {"dinobench": __version__, "python": platform.python_version(),
                         "torch": torch.__version__},
            "world_size": info.world_size, "deterministic": opts.deterministic,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        md = write_results(folder.path, rows, meta, {"attention": figures})
    log(f"\n{md}\nwrote {folder.path}/results.{{json,csv,md}} and figures")
    return rows
