"""dinobench: DINO self-supervised training on small images, measured.

Public API: the DINO math (``dino_loss``, ``update_center``, ``ema_update_``,
``cosine_schedule``), evaluation (``knn_classify``, ``attention_mask``, ``jaccard``), the
ViT, the recipes, and ``run`` (the same job as ``python -m dinobench run``).
"""

__version__ = "0.1.0"

import torch as _torch  # noqa: E402

from ._version_check import check_torch as _check_torch  # noqa: E402

_check_torch(_torch.__version__)

from .config import OFFICIAL, RECIPES, SEED, SMALL, Recipe, get_recipe  # noqa: E402
from .dino import (  # noqa: E402
    DINOHead,
    DINOModel,
    SeedHead,
    cosine_schedule,
    dino_loss,
    ema_update_,
    update_center,
)
from .errors import ConfigError, DataError, UserError  # noqa: E402
from .eval.attention import attention_mask, jaccard  # noqa: E402
from .eval.knn import knn_classify  # noqa: E402
from .run import RunOptions, run  # noqa: E402
from .vit import ViT, ViTConfig  # noqa: E402

__all__ = [
    "ConfigError", "DINOHead", "DINOModel", "DataError", "OFFICIAL", "RECIPES", "Recipe",
    "RunOptions", "SEED", "SMALL", "SeedHead", "UserError", "ViT", "ViTConfig", "attention_mask",
    "cosine_schedule", "dino_loss", "ema_update_", "get_recipe", "jaccard", "knn_classify",
    "run", "update_center",
]
