"""Small kernels of the DINO step and of evaluation: loss, centering, EMA, k-NN.

Groups put a lever beside its baseline, measured in the same run: ``ema`` times the fused
``_foreach`` update against the per-parameter loop of the DINO reference code.
"""

from __future__ import annotations

import pytest
import torch

from dinobench.dino.center import update_center
from dinobench.dino.ema import ema_update_
from dinobench.dino.loss import dino_loss
from dinobench.eval.knn import knn_classify


@pytest.mark.benchmark(group="dino_loss")
@pytest.mark.parametrize("K", [10, 4096], ids=["seed-K10", "official-K4096"])
def test_dino_loss_forward_backward(timed, env, K):
    B = env.batch
    g = torch.Generator(env.device).manual_seed(0)
    student = torch.randn(10 * B, K, device=env.device, generator=g).requires_grad_(True)
    teacher = torch.randn(2 * B, K, device=env.device, generator=g)
    center = torch.zeros(1, K, device=env.device)

    def fn():
        student.grad = None
        loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
        loss.backward()
        return loss

    timed(fn, rounds=env.rounds * 5, iterations=5 if env.cuda else 1)


@pytest.mark.benchmark(group="update_center")
def test_update_center(timed, env):
    K = 4096
    teacher = torch.randn(2 * env.batch, K, device=env.device)
    center = torch.zeros(1, K, device=env.device)
    timed(lambda: update_center(center, teacher, 0.9), rounds=env.rounds * 5,
          iterations=10 if env.cuda else 1)


@torch.no_grad()
def ema_loop_(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """The DINO reference code's EMA: one multiply-add per parameter tensor."""
    for p_s, p_t in zip(student.parameters(), teacher.parameters()):
        p_t.data.mul_(momentum).add_((1 - momentum) * p_s.detach().data)


@pytest.mark.benchmark(group="ema")
@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_ema_update(timed, env, trainer, impl):
    fn = ema_update_ if impl == "foreach" else ema_loop_
    timed(lambda: fn(trainer.teacher, trainer.student, 0.996), rounds=env.rounds * 5,
          iterations=5 if env.cuda else 1)


@pytest.mark.benchmark(group="knn_classify")
def test_knn_classify(timed, env):
    # 50,000 x 10,000 as in CIFAR-10 on CUDA; a 10x smaller bank and query set on a CPU.
    n_train, n_test = (50_000, 10_000) if env.cuda else (5_000, 1_000)
    g = torch.Generator(env.device).manual_seed(0)
    train = torch.randn(n_train, 192, device=env.device, generator=g)
    test = torch.randn(n_test, 192, device=env.device, generator=g)
    labels = torch.randint(0, 10, (n_train,), device=env.device, generator=g)
    timed(lambda: knn_classify(train, labels, test, k=20, num_classes=10),
          rounds=max(3, env.rounds // 2))
