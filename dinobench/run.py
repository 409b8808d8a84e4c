"""The main job: pre-train DINO on each dataset, evaluate it, write tables and figures.

``run(RunOptions(...))`` is what ``python -m dinobench run`` does. Each (dataset, seed)
gives long-format rows for the DINO teacher and for a randomly initialised ViT of the same
shape (the chance reference every score is read against).
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .config import PROFILES, Recipe, get_recipe
from .data import SPECS, Dataset, DatasetSpec, known_datasets, load_dataset
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer
from .errors import ConfigError, DataError
from .eval.features import extract_features, to_model_input
from .eval.knn import knn_top1
from .report import write_results
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
    return f"cpu ({platform.processor() or platform.machine()}, "\
           f"{torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@torch.no_grad()
def attention_maps(backbone: ViT, images: torch.Tensor, mean, std) -> torch.Tensor:
    """Last block, CLS query, mean over heads: ``(N, gh, gw)`` float32 on the CPU."""
    backbone.eval()
    device = next(backbone.parameters()).device
    x = to_model_input(images.to(device), mean, std, backbone.cfg.image_size)
    return backbone.cls_attention(x).mean(dim=1).float().cpu()


def evaluate_knn(backbone: ViT, ds: Dataset, opts: RunOptions) -> float:
    mean, std = ds.spec.mean, ds.spec.std
    train = extract_features(backbone, ds.train_images, mean, std)
    test = extract_features(backbone, ds.test_images, mean, std)
    return knn_top1(train, ds.train_labels, test, ds.test_labels, k=opts.knn_k,
                    temperature=opts.knn_temperature, num_classes=ds.spec.num_classes)


def run_dataset(ds: Dataset, opts: RunOptions, out_dir: Path, log: Callable[[str], None]
                ) -> tuple[list[dict], list[dict], dict]:
    recipe = resolve_recipe(opts, ds.name, ds.spec.epochs)
    cfg = vit_config(recipe, ds.spec)
    device = torch.device(opts.device or default_device())
    crop_cfg = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size,
                                           ds.spec.mean, ds.spec.std)
    rows, figures = [], []
    context = {"recipe": recipe.name, "epochs": recipe.epochs,
               "n_train": int(ds.pretrain_images.shape[0]),
               "n_test": int(ds.test_images.shape[0]), "device": device_name(device),
               "image_size": cfg.image_size, "grid": cfg.grid}
    log(f"[{ds.name}] {ds.pretrain_images.shape[0]:,} pre-training images, "
        f"{ds.test_images.shape[0]:,} test; ViT {cfg.depth}x{cfg.dim}, "
        f"{cfg.grid}x{cfg.grid} patches of {cfg.patch_size} px; recipe {recipe.name}, "
        f"{recipe.epochs} epochs, batch {recipe.batch_size}, on {device}")
    for seed in opts.seeds:
        trainer = DINOTrainer(recipe, cfg, crop_cfg, device=device, seed=seed,
                              compile=opts.compile,
                              log_path=out_dir / f"train_{ds.name}_seed{seed}.jsonl",
                              progress=opts.progress, log=log)
        result = trainer.fit(ds.pretrain_images)
        teacher = result.teacher.backbone
        t0 = time.perf_counter()
        dino_knn = evaluate_knn(teacher, ds, opts)
        eval_seconds = time.perf_counter() - t0
        torch.manual_seed(seed)
        random_vit = ViT(cfg).to(device)  # same shape, same seed, never trained
        random_knn = evaluate_knn(random_vit, ds, opts)
        log(f"[{ds.name}] seed {seed}: k-NN top-1 {dino_knn:.2f}% (DINO teacher) vs "
            f"{random_knn:.2f}% (random init); trained in {result.seconds:.1f} s")
        for model, value, seconds in ((f"dino-{recipe.name}", dino_knn, result.seconds),
                                      ("random-init", random_knn, eval_seconds)):
            rows.append({"dataset": ds.name, "model": model, "metric": "knn_top1",
                         "value": value, **context, "seed": seed,
                         "seconds": round(seconds, 3), "k": opts.knn_k,
                         "temperature": opts.knn_temperature})
        if seed == opts.seeds[0] and opts.attention_images > 0:
            imgs = ds.test_images[:opts.attention_images]
            maps = attention_maps(teacher, imgs, ds.spec.mean, ds.spec.std)
            figures.append({"dataset": ds.name, "model": f"dino-{recipe.name}",
                            "images": imgs.permute(0, 2, 3, 1).tolist(),
                            "maps": [[[round(v, 5) for v in r] for r in m]
                                     for m in maps.tolist()]})
    return rows, figures, dataclasses.asdict(recipe)


def check_options(opts: RunOptions) -> None:
    """Fail on a bad dataset name or option before any data is loaded or trained."""
    if not opts.datasets:
        raise ConfigError("--datasets needs at least one name")
    if not opts.seeds:
        raise ConfigError("--seeds needs at least one seed")
    for name in opts.datasets:
        if name not in SPECS:
            raise DataError(f"unknown dataset {name!r}; known datasets: "
                            f"{', '.join(known_datasets())}")
        vit_config(resolve_recipe(opts, name, SPECS[name].epochs), SPECS[name])


def default_out(opts: RunOptions) -> Path:
    profile = opts.profile or ("quick" if list(opts.datasets) == ["digits"] else "full")
    return Path("results") / f"{'-'.join(opts.datasets)}-{opts.recipe}-{profile}"


def run(opts: RunOptions | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train and evaluate on every dataset in ``opts``; write the run folder; return rows."""
    opts = opts or RunOptions()
    out_dir = Path(opts.out) if opts.out else default_out(opts)
    check_options(opts)
    t0 = time.perf_counter()
    rows, figures, recipes = [], [], {}
    for name in opts.datasets:
        ds = load_dataset(name, **opts.data_kwargs())
        ds_rows, ds_figures, recipes[name] = run_dataset(ds, opts, out_dir, log)
        rows += ds_rows
        figures += ds_figures
    meta = {
        "command": " ".join(sys.argv), "datasets": list(opts.datasets),
        "recipes": recipes, "seeds": list(opts.seeds), "git_commit": git_commit(),
        "versions": {"dinobench": __version__, "python": platform.python_version(),
                     "torch": torch.__version__},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    md = write_results(out_dir, rows, meta, {"attention": figures})
    log(f"\n{md}\nwrote {out_dir}/results.{{json,csv,md}} and figures")
    return rows
