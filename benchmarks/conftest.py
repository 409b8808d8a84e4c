"""pytest-benchmark kernels of dinobench, outside the default test run (``testpaths`` is
``tests``):

    pytest benchmarks --benchmark-only                  # or: tox -e bench
    pytest benchmarks --benchmark-only --benchmark-compare   # against the last saved run

Every run is saved under .benchmarks/ (pytest-benchmark's autosave, turned on here unless
``--benchmark-save`` names the run), so the next run can ``--benchmark-compare`` with it.

Sizes are realistic on CUDA (batch 256) and tiny on a CPU (batch 8); the environment
variables ``DINOBENCH_BENCH_BATCH``, ``DINOBENCH_BENCH_DEPTH`` and
``DINOBENCH_BENCH_ROUNDS`` override them, and ``DINOBENCH_BENCH_THREADS`` sets torch's CPU
threads. Every timed callable synchronises the device
before it returns, so a round measures finished work, not queued kernels.
"""

from __future__ import annotations

import os
import platform
from types import SimpleNamespace

import pytest
import torch

from dinobench.bench import SHAPES
from dinobench.config import SEED
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer
from dinobench.vit import ViTConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
BATCH = int(os.environ.get("DINOBENCH_BENCH_BATCH", 256 if CUDA else 8))
DEPTH = int(os.environ.get("DINOBENCH_BENCH_DEPTH", 12))
ROUNDS = int(os.environ.get("DINOBENCH_BENCH_ROUNDS", 20 if CUDA else 3))
if os.environ.get("DINOBENCH_BENCH_THREADS"):  # 1 gives steadier timings on a shared CPU
    torch.set_num_threads(int(os.environ["DINOBENCH_BENCH_THREADS"]))
SHAPE = SHAPES["cifar10"]


def sync() -> None:
    """Wait for every kernel queued on the benchmark device."""
    if CUDA:
        torch.cuda.synchronize(DEVICE)


def autocast():
    """bf16 on CUDA as the trainer runs it; a no-op on a CPU (fp32)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)


@pytest.fixture(scope="session")
def env() -> SimpleNamespace:
    """Device, sizes and helpers: ``env.device``, ``env.cuda``, ``env.batch``,
    ``env.depth``, ``env.rounds``, ``env.sync()``, ``env.autocast()``."""
    return SimpleNamespace(device=DEVICE, cuda=CUDA, batch=BATCH, depth=DEPTH, rounds=ROUNDS,
                           sync=sync, autocast=autocast)


@pytest.fixture
def timed(benchmark):
    """``timed(fn, rounds=..., iterations=...)``: benchmark ``fn`` with a device sync before
    each return, after one untimed warm-up round."""

    def run(fn, *, rounds: int = ROUNDS, iterations: int = 1):
        def synced():
            out = fn()
            sync()
            return out

        benchmark.extra_info.update({"device": str(DEVICE), "batch": BATCH, "depth": DEPTH})
        return benchmark.pedantic(synced, rounds=rounds, iterations=iterations,
                                  warmup_rounds=1)

    return run


@pytest.fixture(scope="session")
def setup():
    """The seed recipe on CIFAR-10 shapes at benchmark size: recipe, ViT config, crops."""
    recipe = SEED.replace(batch_size=BATCH, depth=DEPTH).validate()
    cfg = ViTConfig(image_size=SHAPE.image_size, grid=SHAPE.grid, in_chans=SHAPE.channels,
                    depth=DEPTH)
    crop = MultiCropConfig.from_recipe(recipe, cfg.image_size, cfg.patch_size, SHAPE.mean,
                                       SHAPE.std)
    return recipe, cfg, crop


@pytest.fixture(scope="session")
def trainer(setup) -> DINOTrainer:
    recipe, cfg, crop = setup
    return DINOTrainer(recipe, cfg, crop, device=DEVICE, progress=False, log=lambda s: None)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """A batch of synthetic ``uint8`` images on the device."""
    g = torch.Generator(DEVICE).manual_seed(0)
    return torch.randint(0, 256, (BATCH, SHAPE.channels, SHAPE.image_size, SHAPE.image_size),
                         dtype=torch.uint8, device=DEVICE, generator=g)


@pytest.fixture(scope="session")
def crops(trainer, images) -> list[torch.Tensor]:
    """One multi-crop of ``images``: ``[global (2B, C, 32, 32), local (8B, C, 16, 16)]``."""
    return trainer.multicrop(images, torch.Generator(DEVICE).manual_seed(1))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Save every benchmark run (before pytest-benchmark reads its options)."""
    opt = config.option
    if hasattr(opt, "benchmark_autosave") and not (opt.benchmark_save or opt.benchmark_disable):
        from pytest_benchmark.utils import get_tag

        opt.benchmark_autosave = opt.benchmark_autosave or get_tag()  # what the flag stores


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = torch.cuda.get_device_name(DEVICE) if CUDA else None
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["cudnn"] = torch.backends.cudnn.version() if CUDA else None
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["python_build"] = platform.python_implementation()
    machine_info["dinobench_sizes"] = {"batch": BATCH, "depth": DEPTH, "rounds": ROUNDS}
