"""Which classes a trained teacher's k-NN confuses, and what each block's CLS token reads.

    python scripts/knn_confusions.py CHECKPOINT --data-dir ../shared/data --train-subset 10000

Loads the teacher backbone from a run's checkpoint (``variants/.../checkpoints/*.pt``),
embeds the dataset's train split (the k-NN bank, validation images included) and its
test split, and prints the test k-NN (k = 20, T = 0.07, as the runs) on the CLS token of
each of the last blocks and on their concatenation, then the per-class accuracy and the
most frequent confusions of the last block's k-NN. A diagnosis, not a result: the runs'
own tables hold the reported numbers.
"""

from __future__ import annotations

import argparse

import torch

from dinobench import checkpoint
from dinobench.data import load_dataset
from dinobench.eval.features import extract_features
from dinobench.eval.knn import knn_classify
from dinobench.vit import ViT, ViTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=None,
                   help="the run's --train-subset (the checkpoint records the images' "
                        "fingerprint, not the flag)")
    p.add_argument("--blocks", type=int, default=4, help="the last this many blocks")
    p.add_argument("--top", type=int, default=10, help="confusions to list")
    args = p.parse_args()

    saved = checkpoint.load(args.checkpoint)
    ident = saved["identity"]
    vit = ViT(ViTConfig(**ident["vit"]))
    prefix = "backbone."
    vit.load_state_dict({k[len(prefix):]: v for k, v in saved["trainer"]["teacher"].items()
                         if k.startswith(prefix)})
    ds = load_dataset(ident["dataset"], data_dir=args.data_dir, train_subset=args.train_subset)
    mean, std, D = ds.spec.mean, ds.spec.std, vit.cfg.dim
    n = min(args.blocks, vit.cfg.depth)
    bank = extract_features(vit, ds.train_images, mean, std, n_last_blocks=n)
    query = extract_features(vit, ds.test_images, mean, std, n_last_blocks=n)

    def accuracy(cols: slice) -> tuple[float, torch.Tensor]:
        pred = knn_classify(bank[:, cols], ds.train_labels, query[:, cols])
        return (pred == ds.test_labels).double().mean().item() * 100, pred

    print(f"{ident['dataset']}: {len(ds.train_labels)} bank images, {len(ds.test_labels)} test")
    for b in range(n):  # features are ordered oldest block first, the last block last
        print(f"  test k-NN, CLS of block {vit.cfg.depth - n + b + 1}: "
              f"{accuracy(slice(b * D, (b + 1) * D))[0]:.2f}%")
    print(f"  test k-NN, last {n} blocks' CLS concatenated: {accuracy(slice(None))[0]:.2f}%")

    _, pred = accuracy(slice((n - 1) * D, n * D))
    k = ds.spec.num_classes
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((ds.test_labels, pred), torch.ones_like(pred), accumulate=True)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1) * 100
    print("  per-class accuracy (last block): " +
          ", ".join(f"{c}: {a:.1f}" for c, a in enumerate(per_class.tolist())))
    off = confusion.clone().fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(args.top, k * k - k))
    print("  most frequent confusions (true -> predicted: images, % of the true class):")
    for c, i in zip(counts.tolist(), flat.tolist()):
        t, q = divmod(i, k)
        print(f"    {t} -> {q}: {c} ({c / confusion[t].sum().item() * 100:.1f}%)")


if __name__ == "__main__":
    main()
