"""Recipes: every hyperparameter of a DINO run, as one dataclass with two presets.

``seed``      the study this package grows out of (DESIGN.md): linear head to K = 10,
              student temperature 0.9, teacher 0.05, local crops cut from the global ones.
``official``  the DINO paper and its reference code (Caron et al. 2021, arXiv:2104.14294):
              MLP head to K = 4096, student 0.1, teacher 0.04 -> 0.07, locals from the image.

Both share the seed's ViT (hidden 192, 12 layers, 4 heads, MLP 768). Every field is a
CLI flag (``--student-temp 0.2``); ``profile`` presets shrink a run to fit a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError


def _f(default, help: str):
    """A recipe field with its help text (shown by ``--help``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Recipe:
    name: str = "official"  # preset this recipe started from (recorded in every result row)
    # --- backbone: the seed's compact ViT (Table 1) ---
    dim: int = _f(192, "hidden size D")
    depth: int = _f(12, "transformer blocks")
    heads: int = _f(4, "attention heads")
    mlp_dim: int = _f(768, "MLP hidden size")
    drop_path: float = _f(0.1, "stochastic depth rate of the student (the teacher uses none)")
    image_size: int | None = _f(None, "side of a global crop in pixels")
    grid: int | None = _f(None, "patches per side of a global crop (must divide --image-size)")
    # --- projection head ---
    head: str = _f("official", "'seed': one linear map to K; 'official': MLP 2048-2048-256, "
                   "L2 normalisation, weight-normalised linear to K")
    out_dim: int = _f(4096, "K, the number of outputs the softmax runs over")
    head_hidden_dim: int = _f(2048, "hidden width of the official head's MLP")
    head_bottleneck_dim: int = _f(256, "bottleneck of the official head, before L2 norm")
    freeze_last_layer_epochs: int = _f(1, "official head: its last layer is not updated "
                                          "during these first epochs")
    # --- sharpening and centering ---
    student_temp: float = _f(0.1, "student temperature tau_s")
    teacher_temp: float = _f(0.07, "teacher temperature tau_t after its warm-up")
    warmup_teacher_temp: float = _f(0.04, "tau_t at epoch 0, raised linearly")
    warmup_teacher_temp_epochs: int = _f(30, "epochs of teacher-temperature warm-up; 0: "
                                            "constant from the start")
    center_momentum: float = _f(0.9, "m in c <- m c + (1 - m) mean(teacher outputs)")
    teacher_momentum: float = _f(0.996, "lambda at step 0; cosine schedule to 1")
    # --- optimisation (AdamW) ---
    epochs: int = _f(100, "training epochs over the pre-training images (the seed's: "
                          "MNIST 200, CIFAR-10 and STL-10 1000)")
    batch_size: int = _f(256, "images per step (each gives n_global + n_local crops)")
    lr: float = _f(5e-4, "peak learning rate per 256 images; scaled linearly with batch_size")
    min_lr: float = _f(1e-6, "end of the cosine decay")
    warmup_epochs: int = _f(10, "linear lr warm-up from 0")
    weight_decay: float = _f(0.04, "start of the cosine weight-decay schedule (matrices only)")
    weight_decay_end: float = _f(0.4, "end of the cosine weight-decay schedule")
    clip_grad: float = _f(3.0, "max gradient norm per parameter tensor; 0 disables")
    # --- multi-crop augmentation ---
    n_global: int = _f(2, "global views: seen by teacher and student")
    n_local: int = _f(8, "local views: seen by the student only")
    global_scale: tuple[float, float] = _f((0.4, 1.0), "area fraction of a global crop")
    local_scale: tuple[float, float] = _f((0.05, 0.4), "area fraction of a local crop")
    local_size_ratio: float = _f(0.5, "local crop side / global crop side")
    local_from_global: bool = _f(False, "the seed cuts each local crop from a global crop")
    flip_p: float = _f(0.5, "probability of a horizontal flip")
    jitter_p: float = _f(0.8, "probability of colour jitter (3-channel data only)")
    jitter: tuple[float, float, float, float] = _f(
        (0.4, 0.4, 0.2, 0.1), "colour jitter strengths: brightness, contrast, saturation, hue")
    grey_p: float = _f(0.2, "probability of greyscale (3-channel data only)")
    blur_p: tuple[float, float, float] = _f((1.0, 0.1, 0.5), "blur probability: first global "
                                            "view, other global views, local views")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "blur sigma range in pixels of a 224-px "
                                         "crop; scaled to the crop side")
    solarize_p: float = _f(0.2, "probability of solarisation, second global view only")

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def validate(self) -> Recipe:
        """Raise :class:`ConfigError` naming the first bad field and its valid range."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(what)

        for f in ("dim", "depth", "heads", "mlp_dim", "epochs", "batch_size", "n_global",
                  "head_hidden_dim", "head_bottleneck_dim"):
            v = getattr(self, f)
            need(v >= 1, f"--{_flag(f)} must be at least 1, got {v}")
        need(self.batch_size >= 2, f"--batch-size {self.batch_size} is too small for "
             "centering, which averages the teacher output over a batch; use 2 or more")
        need(self.drop_path < 1.0, f"--drop-path must lie in [0, 1), got {self.drop_path}")
        need(self.dim % self.heads == 0,
             f"--dim ({self.dim}) must be a multiple of --heads ({self.heads})")
        need(self.head in ("seed", "official"),
             f"--head must be 'seed' or 'official', got {self.head!r}")
        need(self.out_dim >= 2, f"--out-dim (K) must be at least 2, got {self.out_dim}: "
             "a softmax over one output carries no information")
        for f in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr"):
            v = getattr(self, f)
            need(math.isfinite(v) and v > 0, f"--{_flag(f)} must be positive, got {v}")
        for f in ("center_momentum", "teacher_momentum", "drop_path", "flip_p", "jitter_p",
                  "grey_p", "solarize_p"):
            v = getattr(self, f)
            need(0.0 <= v <= 1.0, f"--{_flag(f)} must lie in [0, 1], got {v}")
        need(all(0.0 <= p <= 1.0 for p in self.blur_p),
             f"--blur-p values must lie in [0, 1], got {self.blur_p}")
        for f in ("n_local", "warmup_epochs", "warmup_teacher_temp_epochs",
                  "freeze_last_layer_epochs", "min_lr", "weight_decay", "weight_decay_end",
                  "clip_grad"):
            v = getattr(self, f)
            need(v >= 0, f"--{_flag(f)} must not be negative, got {v}")
        need(self.n_crops >= 2, "DINO needs at least two crops (--n-global + --n-local >= 2)")
        for f in ("global_scale", "local_scale"):
            lo, hi = getattr(self, f)
            need(0.0 < lo <= hi <= 1.0, f"--{_flag(f)} must satisfy 0 < low <= high <= 1, "
                 f"got {lo} {hi}")
        need(0.0 < self.local_size_ratio <= 1.0,
             f"--local-size-ratio must lie in (0, 1], got {self.local_size_ratio}")
        need(0.0 < self.blur_sigma[0] <= self.blur_sigma[1],
             f"--blur-sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        need(all(j >= 0 for j in self.jitter) and self.jitter[3] <= 0.5,
             f"--jitter needs non-negative strengths and hue <= 0.5, got {self.jitter}")
        for f in ("image_size", "grid"):
            v = getattr(self, f)
            need(v is None or v >= 1, f"--{_flag(f)} must be at least 1, got {v}")
        need(all(math.isfinite(v) for v in (*self.blur_sigma, self.local_size_ratio,
                                             *self.jitter, self.clip_grad, self.min_lr,
                                             self.weight_decay, self.weight_decay_end)),
             "recipe values must be finite numbers (no inf or nan)")
        return self


def _flag(name: str) -> str:
    return name.replace("_", "-")


OFFICIAL = Recipe()

SEED = Recipe(
    name="seed",
    head="seed",
    out_dim=10,  # the seed's table gives the label count as K
    student_temp=0.9,
    teacher_temp=0.05,
    warmup_teacher_temp=0.05,
    warmup_teacher_temp_epochs=0,
    freeze_last_layer_epochs=0,
    global_scale=(0.5, 1.0),  # "scale >= 50%"
    local_scale=(0.05, 0.5),  # "scale < 50%"
    local_from_global=True,
)

RECIPES: dict[str, Recipe] = {"seed": SEED, "official": OFFICIAL}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


@dataclass(frozen=True)
class Profile:
    """A preset of run length and model size, applied on top of a recipe."""

    name: str
    changes: dict = field(default_factory=dict)
    note: str = ""


PROFILES: dict[str, Profile] = {
    # The recipe as written: the dataset's epoch count from the seed unless --epochs says.
    "full": Profile("full", {}, "the recipe unchanged"),
    # Minutes on two CPU cores: a shallower ViT (same width and heads), ten short epochs.
    # A run of a few hundred steps needs a faster teacher (momentum 0.99, not 0.996) and
    # a higher learning rate, or the teacher barely leaves its initialisation.
    "quick": Profile(
        "quick",
        {"depth": 4, "epochs": 10, "batch_size": 64, "lr": 2e-3, "teacher_momentum": 0.99,
         "warmup_epochs": 1, "warmup_teacher_temp_epochs": 0, "n_local": 4,
         "drop_path": 0.0},
        "CPU minutes: 4 blocks, 10 epochs, batch 64, 4 local crops, lr 2e-3 per 256, "
        "teacher momentum 0.99",
    ),
}


def recipe_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Recipe) if f.name != "name"]
