"""Measuring tools for ``dinobench bench`` and the benchmark suite: device timers, a
measured matmul peak, FLOPs counted from the model and the formula they are checked
against, peak memory, and the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time

import torch
from torch import nn
from torch.utils import flop_counter

from . import __version__
from .dino.multicrop import MultiCropConfig
from .dino.train import DINOTrainer
from .vit import ViTConfig, forward_flops


class Timer:
    """Seconds between ``start()`` and ``stop()``: CUDA events on a GPU (device time of
    all work queued in between), wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._t1.record()
            self._t1.synchronize()
            return self._t0.elapsed_time(self._t1) / 1000.0
        return time.perf_counter() - self._t0


def cpu_count() -> int:
    """CPUs this process may run on (``nproc``), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reference_workers_default() -> int:
    """``nproc - 2``, at least 1: the main process (the model step) and the pin-memory
    thread keep a core each, so the reference's workers do not compete with them."""
    return max(1, cpu_count() - 2)


def time_repeats(fn, n: int, repeats: int, timer: Timer) -> list[float]:
    """Seconds per call of ``fn``, one value per repeat of ``n`` calls."""
    out = []
    for _ in range(repeats):
        timer.start()
        for _ in range(n):
            fn()
        out.append(timer.stop() / n)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def warm_up(fn, seconds: float, timer: Timer, calls: int = 1) -> int:
    """Call ``fn`` in rounds of ``calls`` until ``seconds`` of it have run (one round at
    least); return the number of calls. A GPU raises its clocks over the first fraction of
    a second under load, so a peak timed straight away reads low."""
    ran, n = 0.0, 0
    while True:
        ran += time_repeats(fn, calls, 1, timer)[0] * calls
        n += calls
        if ran >= seconds:
            return n


def matmul_peak(device: torch.device, dtype: torch.dtype | None = None,
                warmup_s: float | None = None) -> tuple[float, str]:
    """Measured matmul FLOP/s, the best of several timings of ``n^3`` products in the
    step's dtype (default: bf16 on CUDA, fp32 on a CPU): n = 8192 on CUDA, 2048 on a CPU,
    after ``warmup_s`` seconds of the same product (default: 1 s on CUDA, one call on a
    CPU). Other processes on a shared CPU can only slow it down, so the best is the
    closest to the machine's peak."""
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n, calls, repeats = (8192, 10, 3) if cuda else (2048, 1, 6)
    warmup_s = (1.0 if cuda else 0.0) if warmup_s is None else warmup_s
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    warm_up(lambda: a @ b, warmup_s, timer, calls)
    seconds = min(time_repeats(lambda: a @ b, calls, repeats, timer))
    warmed = f"{warmup_s:g} s warm-up" if warmup_s > 0 else "a warm-up call"
    return 2 * n**3 / seconds, (f"{str(dtype).split('.')[-1]} {n}^3 matmul, best of "
                                f"{repeats} after {warmed}")


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                       out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                 value_shape)


def _flop_mode() -> flop_counter.FlopCounterMode:
    """A FLOP counter that also knows the CPU's fused attention kernels (not in torch's
    table), so counts agree between CPU and CUDA."""
    custom = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward",
                      _sdpa_cpu_backward)):
        if hasattr(torch.ops.aten, name):
            custom[getattr(torch.ops.aten, name)] = fn
    return flop_counter.FlopCounterMode(display=False, custom_mapping=custom)


def step_flops_formula(cfg: ViTConfig, crop: MultiCropConfig, head: nn.Module) -> float:
    """FLOPs of one step per image from :func:`forward_flops`: the student's forward and
    backward (3x forward) over every crop, the teacher's forward over the global crops,
    the head's matrices on every crop; minus one patch-embedding pass per student crop,
    since no gradient flows to the pixels. Norms, softmax, loss and optimizer left out."""
    p = cfg.patch_size
    n_g, n_l = 1 + (crop.global_size // p) ** 2, 1 + (crop.local_size // p) ** 2
    head_f = 2 * sum(w.numel() for w in head.parameters() if w.ndim == 2)

    def patch(n_tokens: int) -> float:
        return 2 * (n_tokens - 1) * cfg.in_chans * p * p * cfg.dim

    student = (3 * (crop.n_global * (forward_flops(cfg, n_g) + head_f)
                    + crop.n_local * (forward_flops(cfg, n_l) + head_f))
               - crop.n_global * patch(n_g) - crop.n_local * patch(n_l))
    return student + crop.n_global * (forward_flops(cfg, n_g) + head_f)


def count_step_flops(trainer: DINOTrainer, batch: torch.Tensor, gen: torch.Generator,
                     **step_kw) -> dict:
    """FLOPs per image of one eager step, counted: the model (student forward + backward,
    teacher forward, loss) and, separately, the augmentation. Runs one real step."""
    with _flop_mode() as aug:
        crops = trainer.multicrop(batch, gen)
    saved = trainer.multicrop, trainer.student_fwd, trainer.teacher_fwd
    trainer.multicrop = lambda images, generator: crops
    trainer.student_fwd, trainer.teacher_fwd = trainer.student, trainer.teacher
    try:
        with _flop_mode() as model:
            trainer.step(batch, gen, **step_kw)
    finally:
        trainer.multicrop, trainer.student_fwd, trainer.teacher_fwd = saved
    B = batch.shape[0]
    return {"model": model.get_total_flops() / B, "augmentation": aug.get_total_flops() / B}


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.processor() or platform.machine()}, " \
               f"{torch.get_num_threads()} threads)"
    return {"card": card, "device": str(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "dinobench": __version__}


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU memory allocated (timed steps)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS of the process"


def knn_seconds(backbone: nn.Module, n_train: int, n_test: int, channels: int, side: int,
                mean, std, *, seed: int = 0, k: int = 20) -> dict:
    """Seconds of a k-NN evaluation on synthetic ``uint8`` images already on the device:
    features of the train and test images, then :func:`knn_classify`; after a warm-up."""
    from .eval.features import extract_features
    from .eval.knn import knn_classify

    device = next(backbone.parameters()).device
    g = torch.Generator(device).manual_seed(seed)

    def images(n):
        return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8,
                             device=device, generator=g)

    train, test = images(n_train), images(n_test)
    labels = torch.randint(0, 10, (n_train,), device=device, generator=g)
    bs = 4096 if device.type == "cuda" else 256

    def run(nr, ne):
        f_train = extract_features(backbone, train[:nr], mean, std, batch_size=bs)
        f_test = extract_features(backbone, test[:ne], mean, std, batch_size=bs)
        return knn_classify(f_train, labels[:nr], f_test, k=k, num_classes=10)

    run(min(bs, n_train), min(bs, n_test))  # warm-up
    timer = Timer(device)
    timer.start()
    run(n_train, n_test)
    return {"n_train": n_train, "n_test": n_test, "seconds": timer.stop()}


def profile_table(trainer: DINOTrainer, batch: torch.Tensor, step_kw: dict, steps: int, *,
                  seed: int = 0, rows: int = 15) -> str:
    """torch.profiler over ``steps`` calls of ``trainer.step``: the top operators by self
    time (device time on CUDA, CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = batch.device
    gen = torch.Generator(device).manual_seed(seed)
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.step(batch, gen, **step_kw)
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=64)
