"""What the DINO backbone's shape reads with every label: a k-NN on a supervised ViT.

    python scripts/supervised_ceiling.py --data-dir ../shared/data --train-subset 10000 \
        --epochs 40 --pos-embed-std 1.0 --image-size 16

Trains the ViT a DINO run of ``--recipe`` (default ``small``) would build, from scratch,
with cross-entropy on the labels of the k-NN bank (the train split less the runs'
validation images), on the recipe's global crops, and prints its classification accuracy
and the runs' k-NN (k = 20, T = 0.07, CLS token) on the same validation images. A yardstick
for the DINO runs' validation k-NN, not a result: without ``--test`` it reads no test image.

With ``--test`` it trains on every labelled train image instead and reads the test split
the way a run's test k-NN does (the whole train split as the bank): the shape's ceiling on
the reported number, for comparison only, since no choice is made on it.
"""

from __future__ import annotations

import argparse
import time

from dinobench.config import get_recipe
from dinobench.curves import validation_split
from dinobench.data import load_dataset
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.eval.features import extract_features
from dinobench.eval.knn import knn_top1
from dinobench.eval.supervised import SupervisedConfig, train_supervised
from dinobench.vit import ViTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--recipe", default="small")
    p.add_argument("--epochs", type=int, default=40, help="supervised epochs over the bank")
    p.add_argument("--pos-embed-std", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--grid", type=int, default=None, help="patches per side")
    p.add_argument("--elastic", type=float, default=None,
                   help="elastic distortion of the crops, as the recipe flag")
    p.add_argument("--lr", type=float, default=SupervisedConfig.lr,
                   help="peak learning rate per 256 images")
    p.add_argument("--batch-size", type=int, default=SupervisedConfig.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true",
                   help="train on the whole train split and read the test split")
    args = p.parse_args()

    ds = load_dataset(args.dataset, data_dir=args.data_dir, train_subset=args.train_subset)
    changes = {k: v for k, v in (("pos_embed_std", args.pos_embed_std),
                                 ("image_size", args.image_size), ("grid", args.grid),
                                 ("elastic", args.elastic)) if v is not None}
    recipe = get_recipe(args.recipe).replace(**changes).for_dataset(ds.spec.natural_images)
    size = recipe.image_size or ds.spec.image_size
    cfg = ViTConfig.for_recipe(recipe, size, recipe.grid or ds.spec.grid, ds.spec.channels)
    crops = MultiCropConfig.from_recipe(recipe, size, cfg.patch_size, ds.spec.mean,
                                        ds.spec.std)
    if args.test:
        fit_x, fit_y = ds.train_images, ds.train_labels
        read_x, read_y, split = ds.test_images, ds.test_labels, "test"
    else:
        val, bank = validation_split(ds)
        fit_x, fit_y = ds.train_images[bank], ds.train_labels[bank]
        read_x, read_y, split = ds.train_images[val], ds.train_labels[val], "validation"
    start = time.perf_counter()
    result = train_supervised(
        cfg, crops, fit_x, fit_y, read_x, read_y, num_classes=ds.spec.num_classes,
        seed=args.seed, log=print,
        cfg=SupervisedConfig(epochs=args.epochs, warmup_epochs=1, lr=args.lr,
                             batch_size=args.batch_size,
                             eval_every=max(1, args.epochs // 5)))
    backbone = result.model.backbone
    f_bank = extract_features(backbone, fit_x, ds.spec.mean, ds.spec.std)
    f_read = extract_features(backbone, read_x, ds.spec.mean, ds.spec.std)
    knn = knn_top1(f_bank, fit_y, f_read, read_y)
    print(f"{args.dataset}, {len(fit_y)} labelled images, {args.epochs} epochs, "
          f"{time.perf_counter() - start:.0f} s: {split} accuracy "
          f"{result.test_top1:.2f}%, {split} k-NN {knn:.2f}%")


if __name__ == "__main__":
    main()
