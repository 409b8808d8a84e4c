"""The head's batch norm: batch statistics over every process, in eval mode too."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinobench.dino.batch_norm import GlobalBatchNorm


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Batch norm written out in float64: biased variance, eps 1e-5."""
    x = x.double()
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) / (var + 1e-5).sqrt() * weight.double() + bias.double()


def test_forward_and_gradient_match_a_float64_batch_norm():
    torch.manual_seed(0)
    norm = GlobalBatchNorm(5).eval()  # eval mode changes nothing: always batch statistics
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(9, 5, requires_grad=True)
    g = torch.randn(9, 5)
    (norm(x) * g).sum().backward()
    xd = x.detach().double().requires_grad_()
    ref = _reference(xd, norm.weight.detach(), norm.bias.detach())
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(norm(x).double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-5)


def test_tiny_differences_between_rows_are_scaled_up_exactly():
    """The case the two-pass float64 statistics are for: rows that differ by 1e-2 around
    a mean of 100. E[x^2] - mean^2 in float32 would be mostly rounding (x^2 ~ 1e4 holds
    about 6e-4 of it, more than the variance, 1e-4)."""
    torch.manual_seed(1)
    x = 100.0 + 1e-2 * torch.randn(64, 3)
    y = GlobalBatchNorm(3)(x)
    torch.testing.assert_close(y.double(), _reference(x, torch.ones(3), torch.zeros(3)),
                               rtol=1e-4, atol=1e-4)
    naive_var = (x * x).mean(0) - x.mean(0) ** 2  # float32, one pass
    assert (naive_var - x.double().var(0, unbiased=False)).abs().max() > 1e-5
    assert y.std(0, unbiased=False).min() > 0.9  # var / (var + eps) ~ 0.9 at eps 1e-5


def test_one_row_is_refused():
    with pytest.raises(ValueError, match="rows >= 2"):
        GlobalBatchNorm(3)(torch.randn(1, 3))


def _worker(rank: int, world: int, init_file: str, x: torch.Tensor, g: torch.Tensor,
            out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        half = x.shape[0] // world
        mine = x[rank * half:(rank + 1) * half].clone().requires_grad_()
        norm = GlobalBatchNorm(x.shape[1]).eval()
        y = norm(mine)
        (y * g[rank * half:(rank + 1) * half]).sum().backward()
        out[rank] = (y.detach(), mine.grad, norm.weight.grad, norm.bias.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 15 s on one core
def test_two_processes_normalise_over_the_global_batch(tmp_path):
    """Each process holds half the rows: outputs and input gradients equal one process
    holding all of them (the gradient of the sum of both processes' losses), and the
    parameter gradients summed over the processes equal the single process's."""
    torch.manual_seed(2)
    x, g = torch.randn(8, 4), torch.randn(8, 4)
    with mp.get_context("spawn").Manager() as manager:  # no fork of a threaded process
        out = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), x, g, out), nprocs=2, join=True)
        parts = [out[0], out[1]]
    xs = x.clone().requires_grad_()
    norm = GlobalBatchNorm(4)
    y = norm(xs)
    (y * g).sum().backward()
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), xs.grad)
    torch.testing.assert_close(parts[0][2] + parts[1][2], norm.weight.grad)
    torch.testing.assert_close(parts[0][3] + parts[1][3], norm.bias.grad)
    # Normalising each half alone would give other outputs.
    alone = torch.cat([GlobalBatchNorm(4)(x[:4]), GlobalBatchNorm(4)(x[4:])])
    assert (alone - y).abs().max() > 1e-2
