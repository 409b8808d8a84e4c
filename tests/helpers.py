"""Shared pieces for the tests: the CLI end to end, tiny trainers, one step's gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dinobench.eval.time_to_accuracy import TIMED_METRICS

REPO = Path(__file__).resolve().parents[1]
# The real MNIST and CIFAR-10 copies (Keras .npz), beside the repository; tests that read
# them are marked real_data and skip with the reason when they are absent.
REAL_DATA = REPO.parent / "shared" / "data"

# A ViT small enough that a digits epoch takes well under a second on one core.
TINY = ["--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "64",
        "--batch-size", "64", "--n-local", "2", "--no-progress"]


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def dinobench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinobench", *args], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=timeout)


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinobench", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=REPO)


def wait_for_epochs(log_path: Path, n: int, proc: subprocess.Popen,
                    timeout: float = 300) -> None:
    """Wait until a running job has logged ``n`` epochs (and so saved them, with
    ``--checkpoint-every 1``); fail if it ends first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log_path.exists() and len(log_path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"the run did not log {n} epochs within {timeout} s")


def rows(run_dir: Path, drop=("seconds", "train_seconds")) -> list[dict]:
    """The run's rows without wall-clock measurements (they differ between identical
    runs): the ``drop`` keys, and the value of a timed metric, of which only whether it
    was reached is kept."""
    data = json.loads((run_dir / "results.json").read_text())
    out = [{k: v for k, v in r.items() if k not in drop} for r in data["rows"]]
    for r in out:
        if r["metric"] in TIMED_METRICS:
            r["value"] = r["value"] is not None
    return out


def trainer_state(run_dir: Path, dataset: str = "digits", seed: int = 0) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / f"{dataset}_seed{seed}.pt",
                      weights_only=True)
    return ckpt["trainer"]


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def tiny_setup(head: str = "seed", channels: int = 3, **changes):
    """A small recipe, ViT and crop config on CIFAR-10 shapes (8x8 patches of 4 px)."""
    from dinobench.config import SEED
    from dinobench.dino.multicrop import MultiCropConfig
    from dinobench.vit import ViTConfig

    recipe = SEED.replace(dim=32, depth=2, heads=2, mlp_dim=64, batch_size=4, n_local=4,
                          head=head, out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8,
                          **changes).validate()
    cfg = ViTConfig(image_size=32, grid=8, in_chans=channels, dim=32, depth=2, heads=2,
                    mlp_dim=64)
    crop = MultiCropConfig.from_recipe(recipe, 32, 4, (0.5,) * channels, (0.25,) * channels)
    return recipe, cfg, crop


def tiny_trainer(recipe, vit_cfg, seed: int = 0):
    """A quiet DINOTrainer on 16-px single-channel crops (4-px patches), for the tiny
    recipe and ViT of conftest's fixtures."""
    from dinobench.dino.multicrop import MultiCropConfig
    from dinobench.dino.train import DINOTrainer

    crop = MultiCropConfig.from_recipe(recipe, 16, 4, (0.5,), (0.25,))
    return DINOTrainer(recipe, vit_cfg, crop, seed=seed, progress=False, log=lambda m: None)


def step_crops(trainer) -> list[torch.Tensor]:
    """The multi-crop views of 8 random 16-px images, from fixed generators."""
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return trainer.multicrop(images, torch.Generator().manual_seed(1))


def step_gradients(trainer, crops) -> tuple[dict[str, torch.Tensor], float]:
    """The student's gradients after the trainer's own forward and backward, and the
    loss it logs."""
    loss = trainer._forward_backward(crops, teacher_temp=0.04)[2].item()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in trainer.student.named_parameters()}, loss


def koleo_float64(features: torch.Tensor) -> torch.Tensor:
    """-mean_i log(min_{j != i} ||x_i - x_j|| + 1e-8) of the L2-normalised rows, from the
    full table of pairwise distances in float64."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True)
    d = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).add(1e-30).sqrt()
    d = d + torch.diag(torch.full((len(x),), float("inf"), dtype=x.dtype))
    return -torch.log(d.min(dim=1).values + 1e-8).mean()
