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
    pos_embed_std: float = _f(0.02, "standard deviation of the initial positional embeddings; "
                                    "0.02 (ViT, DINO) leaves them 25x smaller than the patch "
                                    "embeddings")
    stem: str = _f("patch", "how pixels become tokens: 'patch', one linear map per patch "
                   "(ViT); 'conv', log2(patch) 3x3 stride-2 convolutions with layer norm "
                   "and GELU, then a 1x1 to D (Xiao et al. 2021), so each token sees past "
                   "its patch; needs a patch side that is a power of 2")
    # --- projection head ---
    head: str = _f("official", "'seed': one linear map to K; 'official': MLP 2048-2048-256, "
                   "L2 normalisation, weight-normalised linear to K")
    out_dim: int = _f(4096, "K, the number of outputs the softmax runs over")
    head_hidden_dim: int = _f(2048, "hidden width of the official head's MLP")
    head_bottleneck_dim: int = _f(256, "bottleneck of the official head, before L2 norm")
    head_bn: bool = _f(False, "official head: BatchNorm (batch statistics) after each hidden "
                              "layer, which keeps the teacher's outputs apart on small data")
    norm_last_layer: bool = _f(True, "official head: the last layer's weight norm fixed at "
                               "1, so the logits are cosines; off, it is learnt per output "
                               "(the reference code's ViT-S/16 setting), and with it the "
                               "logits' scale")
    freeze_last_layer_epochs: int = _f(1, "official head: its last layer is not updated "
                                          "during these first epochs")
    # --- sharpening and centering ---
    koleo_weight: float = _f(0.0, "weight of the KoLeo regulariser on the student's CLS "
                             "features of each global view (DINOv2: 0.1): it pushes every "
                             "image away from its nearest neighbour in the batch, spreading "
                             "the features a k-NN reads; 0: off")
    koleo_weight_end: float | None = _f(None, "the KoLeo weight at the end of the run, "
                                        "reached by a half-cosine from --koleo-weight "
                                        "(which must be above 0), as --weight-decay-end; "
                                        "unset: a constant weight")
    align_weight: float = _f(0.0, "weight of a feature-alignment term: the squared distance "
                             "between each student view's L2-normalised CLS feature and "
                             "the teacher's of every other global view (the DINO loss's "
                             "pairs), the teacher's held fixed; the agreement DINO asks "
                             "of the head's outputs, asked of the features a k-NN reads. "
                             "It collapses alone: use it beside --koleo-weight; 0: off")
    dino_weight: float = _f(1.0, "weight of the DINO loss in the objective; 0 trains on "
                            "the KoLeo regulariser alone, an ablation that shows what the "
                            "features owe to self-distillation (the logged loss stays DINO's)")
    ibot_weight: float = _f(0.0, "weight of iBOT's masked-patch loss (DINOv2's patch-level "
                            "term): the student sees its global views with some patches "
                            "replaced by a learnt mask token and predicts, at each hidden "
                            "patch, the teacher's output for that patch of the whole view, "
                            "centred by a running patch center of its own (iBOT's, also "
                            "under --centering sinkhorn); 0: off")
    ibot_mask_ratio: tuple[float, float] = _f((0.1, 0.5), "range of the fraction of a masked "
                                              "view's patches hidden, drawn per view "
                                              "(--ibot-weight > 0 only)")
    ibot_mask_p: float = _f(0.5, "probability that a global view is masked at all; the "
                            "others keep every patch (DINOv2: 0.5)")
    student_temp: float = _f(0.1, "student temperature tau_s")
    teacher_temp: float = _f(0.07, "teacher temperature tau_t after its warm-up")
    warmup_teacher_temp: float = _f(0.04, "tau_t at epoch 0, raised linearly")
    warmup_teacher_temp_epochs: int = _f(30, "epochs of teacher-temperature warm-up; 0: "
                                            "constant from the start")
    center_momentum: float = _f(0.9, "m in c <- m c + (1 - m) mean(teacher outputs)")
    centering: str = _f("momentum", "'momentum': teacher targets softmax((t - c) / tau_t) "
                        "with the running center c (DINO); 'sinkhorn': Sinkhorn-Knopp "
                        "balances the batch's targets over the outputs (SwAV, DINOv2; the "
                        "center is still kept, for the record, but not used)")
    sinkhorn_iterations: int = _f(3, "Sinkhorn-Knopp iterations per step (--centering "
                                     "sinkhorn only)")
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
    flip_p: float | None = _f(0.5, "probability of a horizontal flip; 'auto': 0.5 on "
                              "photographs, 0 on digits (a mirrored digit is another shape)")
    jitter_p: float = _f(0.8, "probability of colour jitter (3-channel data only)")
    jitter: tuple[float, float, float, float] = _f(
        (0.4, 0.4, 0.2, 0.1), "colour jitter strengths: brightness, contrast, saturation, hue")
    jitter_order: str = _f("fixed", "order of the four colour-jitter operations: 'fixed' "
                           "(brightness, contrast, saturation, hue) or 'random', drawn per "
                           "image as torchvision's ColorJitter draws it per call")
    grey_p: float = _f(0.2, "probability of greyscale (3-channel data only)")
    blur_p: tuple[float, float, float] = _f((1.0, 0.1, 0.5), "blur probability: first global "
                                            "view, other global views, local views")
    blur_sigma: tuple[float, float] = _f((0.1, 2.0), "blur sigma range in pixels of a 224-px "
                                         "crop; scaled to the crop side")
    antialias: bool = _f(False, "low-pass a crop that shrinks its source: each output pixel "
                               "averages k x k bilinear samples over its footprint (k = the "
                               "largest shrink factor, rounded up), as PIL's resize filters "
                               "instead of aliasing: the local crops, and the global views "
                               "too where --image-size is under the stored side")
    rotation: float = _f(0.0, "largest rotation of a crop, in degrees: each crop turns by "
                         "an angle uniform in +-rotation about its centre (slant is a "
                         "digit's style, not its class); 0: none")
    elastic: float = _f(0.0, "largest displacement of a crop's elastic distortion, as a "
                        "fraction of its side: a smooth random field (uniform draws at "
                        "--elastic-points control points a side, interpolated "
                        "bilinearly) moves every sample point, bending strokes as "
                        "handwriting does (Simard et al. 2003); 0: none")
    elastic_points: int = _f(5, "control points per side of the elastic field: c points are "
                             "about a (c - 1)th of the crop apart, so two neighbours can "
                             "fold it along a row or column (part of it sampled mirrored) "
                             "once 2 x elastic exceeds about 1 / (c - 1); fewer points bend "
                             "the digit as a whole, more bend its strokes")
    stroke_p: float = _f(0.0, "probability that a crop's strokes change width: it moves a "
                         "uniform fraction of the way to its 3x3 grey dilation or erosion "
                         "(equally likely), so stroke width stops telling views apart")
    solarize_p: float | None = _f(0.2, "probability of solarisation, second global view only; "
                                  "'auto': 0.2 on photographs, 0 on digits (it turns white "
                                  "ink on black into black)")

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def for_dataset(self, natural_images: bool) -> Recipe:
        """The recipe with its 'auto' augmentations (None) decided for a dataset of
        photographs (``natural_images``) or of digits."""
        auto = {"flip_p": 0.5, "solarize_p": 0.2} if natural_images else {
            "flip_p": 0.0, "solarize_p": 0.0}
        decided = {k: v for k, v in auto.items() if getattr(self, k) is None}
        return self.replace(**decided) if decided else self

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
        need(not (self.head_bn and self.head == "seed"),
             "--head-bn needs --head official: the seed head is one linear map, with no "
             "hidden layer to normalise")
        need(self.norm_last_layer or self.head == "official",
             "turning --norm-last-layer off needs --head official: the seed head is one "
             "linear map, with no weight-normalised last layer")
        for f, names in CHOICES.items():
            v = getattr(self, f)
            need(v in names, f"--{_flag(f)} must be one of {', '.join(names)}, got {v!r}")
        need(isinstance(self.sinkhorn_iterations, int) and self.sinkhorn_iterations >= 1,
             f"--sinkhorn-iterations must be an integer of at least 1, got "
             f"{self.sinkhorn_iterations!r}: Sinkhorn-Knopp needs one normalisation of each "
             "kind to return probabilities (DINOv2 uses 3)")
        need(self.out_dim >= 2, f"--out-dim (K) must be at least 2, got {self.out_dim}: "
             "a softmax over one output carries no information")
        for f in ("student_temp", "teacher_temp", "warmup_teacher_temp", "lr", "pos_embed_std"):
            v = getattr(self, f)
            need(math.isfinite(v) and v > 0, f"--{_flag(f)} must be positive, got {v}")
        for f in ("center_momentum", "teacher_momentum", "drop_path", "flip_p", "jitter_p",
                  "grey_p", "solarize_p", "stroke_p", "ibot_mask_p"):
            v = getattr(self, f)
            if v is None and f in AUTO_FIELDS:
                continue
            need(0.0 <= v <= 1.0, f"--{_flag(f)} must lie in [0, 1], got {v}")
        need(all(0.0 <= p <= 1.0 for p in self.blur_p),
             f"--blur-p values must lie in [0, 1], got {self.blur_p}")
        for f in ("n_local", "warmup_epochs", "warmup_teacher_temp_epochs",
                  "freeze_last_layer_epochs", "min_lr", "weight_decay", "weight_decay_end",
                  "clip_grad", "koleo_weight", "dino_weight", "ibot_weight",
                  "align_weight"):
            v = getattr(self, f)
            need(v >= 0, f"--{_flag(f)} must not be negative, got {v}")
        end = self.koleo_weight_end
        need(end is None or (math.isfinite(end) and end >= 0),
             f"--koleo-weight-end must be a finite number, not negative, got {end}")
        need(end is None or self.koleo_weight > 0, "--koleo-weight-end schedules the KoLeo "
             "weight from --koleo-weight, which is 0 (off); give --koleo-weight a positive "
             "start, or drop --koleo-weight-end")
        need(not self.align_weight or self.koleo_weight > 0, "--align-weight alone pulls "
             "every image to one point; give --koleo-weight a positive value beside it")
        need(self.dino_weight > 0 or self.koleo_weight > 0,
             "--dino-weight 0 leaves nothing to train without KoLeo; give --koleo-weight a "
             "positive value, or keep the DINO loss")
        lo, hi = self.ibot_mask_ratio
        need(0.0 < lo <= hi < 1.0, f"--ibot-mask-ratio must satisfy 0 < low <= high < 1 "
             f"(a masked view hides some patches, never all), got {lo} {hi}")
        need(self.ibot_mask_p > 0 or not self.ibot_weight, "--ibot-mask-p 0 masks no view, "
             "so --ibot-weight would train nothing; give it a positive probability")
        need(self.n_crops >= 2, "DINO needs at least two crops (--n-global + --n-local >= 2)")
        for f in ("global_scale", "local_scale"):
            lo, hi = getattr(self, f)
            need(0.0 < lo <= hi <= 1.0, f"--{_flag(f)} must satisfy 0 < low <= high <= 1, "
                 f"got {lo} {hi}")
        need(math.isfinite(self.rotation) and 0.0 <= self.rotation <= 180.0,
             f"--rotation is the largest angle in degrees and must lie in [0, 180], got "
             f"{self.rotation}")
        need(math.isfinite(self.elastic) and 0.0 <= self.elastic <= 0.5,
             f"--elastic is a fraction of a crop's side and must lie in [0, 0.5], got "
             f"{self.elastic}")
        need(isinstance(self.elastic_points, int) and self.elastic_points >= 2,
             f"--elastic-points must be an integer of at least 2 (a corner point per side), "
             f"got {self.elastic_points!r}")
        need(0.0 < self.local_size_ratio <= 1.0,
             f"--local-size-ratio must lie in (0, 1], got {self.local_size_ratio}")
        need(0.0 < self.blur_sigma[0] <= self.blur_sigma[1],
             f"--blur-sigma must satisfy 0 < low <= high, got {self.blur_sigma}")
        need(all(j >= 0 for j in self.jitter) and self.jitter[3] <= 0.5,
             f"--jitter needs non-negative strengths and hue <= 0.5, got {self.jitter}")
        for f in ("image_size", "grid"):
            v = getattr(self, f)
            need(v is None or v >= 1, f"--{_flag(f)} must be at least 1, got {v}")
        for f in ("blur_sigma", "local_size_ratio", "jitter", "clip_grad", "min_lr",
                  "weight_decay", "weight_decay_end", "koleo_weight", "dino_weight",
                  "ibot_weight", "ibot_mask_ratio", "align_weight"):
            v = getattr(self, f)
            need(all(math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))),
                 f"--{_flag(f)} must be a finite number (no inf or nan), got {v}")
        return self


# How the teacher's targets are kept from collapsing onto one output (``Recipe.centering``).
CENTERINGS = ("momentum", "sinkhorn")

# How pixels become tokens (``Recipe.stem``; the ViT builds each, see ``vit.py``).
STEMS = ("patch", "conv")

# The text fields of a recipe and the names each accepts (flags, sweep values, validate).
CHOICES: dict[str, tuple[str, ...]] = {
    "head": ("seed", "official"),
    "centering": CENTERINGS,
    "jitter_order": ("fixed", "random"),
    "stem": STEMS,
}

# Recipe fields added after checkpoints were first written, with the value a record
# without them stands for: kept out of a resume identity while they hold it, so runs made
# before the field existed still resume.
LATER_FIELDS = {"jitter_order": "fixed", "antialias": False, "rotation": 0.0,
                "stroke_p": 0.0, "koleo_weight": 0.0, "stem": "patch", "elastic": 0.0,
                "dino_weight": 1.0, "ibot_weight": 0.0, "ibot_mask_ratio": (0.1, 0.5),
                "ibot_mask_p": 0.5, "koleo_weight_end": None, "norm_last_layer": True,
                "align_weight": 0.0, "elastic_points": 5}


def recipe_identity(recipe: Recipe) -> dict:
    """The recipe as a resume identity: every field, less :data:`LATER_FIELDS` at theirs."""
    return {k: v for k, v in dataclasses.asdict(recipe).items()
            if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


# Fields that may be None: "auto", decided per dataset by Recipe.for_dataset.
AUTO_FIELDS = ("flip_p", "solarize_p")

# Fields whose None means "not used" (the field's help says what stands in its place).
UNSET_FIELDS = ("koleo_weight_end",)

# Frozen features for k-NN and the probes (``--eval-feature``, not a recipe field), as the
# results describe them.
EVAL_FEATURES = {
    "cls": "the CLS token after the final norm",
    "cls+patch-mean": "the CLS token and the mean of the last block's patch tokens, after "
                      "the final norm, concatenated",
}

# The raw-pixel references as the results name them: ``pixels`` at the stored size, and
# ``pixels-<size>px`` at a model's input size where it reads the images shrunk
# (``eval/pixels.py`` makes both).
def input_pixels_name(size: int) -> str:
    """The reference of the pixels at a model's input side, where it differs from the
    stored side (``--image-size``): ``pixels-16px``. Resizing alone changes what a k-NN
    reads (a smaller image is a smoothed one), so a model that reads its images at
    another size is set beside the pixels at that size too."""
    return f"pixels-{size}px"


def is_resized_pixels(model: str) -> bool:
    """Whether ``model`` names a reference made by :func:`input_pixels_name`."""
    return model.startswith("pixels-")


def is_pixels(model: str) -> bool:
    """Whether ``model`` names a raw-pixel reference, at the stored size or resized."""
    return model == "pixels" or is_resized_pixels(model)


# Autocast of the training step (--precision): auto is bf16 on CUDA and float32 on a CPU.
PRECISIONS = ("auto", "bf16", "fp32")


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

# The official recipe made to learn on small data in minutes (docs/recipes.md has the
# studies each choice comes from). Its changes, and why:
SMALL = OFFICIAL.replace(
    name="small",
    # A randomly initialised ViT maps every image to nearly the same CLS feature, so the
    # centred teacher is uniform from the first step and the student learns to be uniform
    # (the uniform collapse the official recipe shows here). Batch norm in the head
    # spreads the teacher's outputs over the batch from the start.
    head_bn=True,
    # A head and K sized for 10 classes and a few thousand images: K = 1,024 and
    # K = 4,096 learnt more slowly within the same budget.
    out_dim=256, head_hidden_dim=512, head_bottleneck_dim=128,
    # No warm-up of tau_t: a run of minutes has no 30 epochs to spend on it.
    teacher_temp=0.04, warmup_teacher_temp_epochs=0,
    # Many small steps beat few large ones: width 128, depth 4, batch 32, and a teacher
    # that follows the student within about a hundred steps.
    dim=128, mlp_dim=512, depth=4, drop_path=0.0, batch_size=32, lr=8e-3,
    # Positions as loud as the patch contents from the start: with 16 patches, where a
    # digit's shape lies in its layout, 0.02 leaves a random ViT a bag of patches.
    pos_embed_std=0.5,
    warmup_epochs=1, teacher_momentum=0.99, n_local=4,
    freeze_last_layer_epochs=1,
    # Crops that keep a recognisable part of a 32-px object: a local crop of 5% of the
    # image is a blob of a few source pixels.
    global_scale=(0.5, 1.0), local_scale=(0.2, 0.5),
    # Flip and solarisation where they keep the class: on photographs, not on digits.
    flip_p=None, solarize_p=None,
    epochs=30,
)

RECIPES: dict[str, Recipe] = {"seed": SEED, "official": OFFICIAL, "small": SMALL}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


@dataclass(frozen=True)
class Profile:
    """A preset of run length and model size, applied on top of a recipe.

    ``per_recipe`` replaces ``changes`` for the recipes it names: a recipe that is already
    sized for minutes (``small``) must not get the batch and learning rate that make the
    paper's recipes move in a few hundred steps.
    """

    name: str
    changes: dict = field(default_factory=dict)
    note: str = ""
    per_recipe: dict = field(default_factory=dict)

    def changes_for(self, recipe: str) -> dict:
        return dict(self.per_recipe.get(recipe, self.changes))


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
        "teacher momentum 0.99 (the small recipe: unchanged, 30 epochs)",
        per_recipe={"small": {"epochs": 30}},
    ),
}


def defaults_text(f: dataclasses.Field, show=str) -> str:
    """A field's value in each preset ("seed / official / small", or one value where
    they agree) and in the quick profile, for ``--help``; ``show`` formats a value."""
    values = [getattr(r, f.name) for r in RECIPES.values()]
    if f.name == "epochs" or (None in values and f.name not in AUTO_FIELDS + UNSET_FIELDS):
        text = "per dataset"
    else:
        shown = [("unset" if f.name in UNSET_FIELDS else "auto") if v is None else show(v)
                 for v in values]
        text = shown[0] if len(set(shown)) == 1 else " / ".join(shown)
    quick = PROFILES["quick"].changes
    if f.name in quick:
        text += f"; quick profile: {show(quick[f.name])}"
    return text


def recipe_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Recipe) if f.name != "name"]
