"""Sinkhorn-Knopp centering against DINOv2's algorithm written out in float64 NumPy, its
marginals, the shifts it ignores, two processes against one, and a trainer run with it."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinobench.cli import main
from dinobench.config import OFFICIAL, SEED
from dinobench.dino.loss import dino_loss, dino_loss_from_probs, teacher_probs
from dinobench.dino.sinkhorn import sinkhorn_knopp
from dinobench.errors import ConfigError
from helpers import one_line_error, tiny_trainer


def reference(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` in the exp domain, float64, one process."""
    Q = np.exp(logits.astype(np.float64) / temp).T  # K x B
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(axis=1, keepdims=True)
        Q = Q / K
        Q = Q / Q.sum(axis=0, keepdims=True)
        Q = Q / B
    return (Q * B).T


def _logits(rows=12, K=5, scale=1.0, seed=0):
    return scale * torch.from_numpy(np.random.default_rng(seed).normal(size=(rows, K)))


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
@pytest.mark.parametrize("temp", [0.04, 0.5])
def test_matches_the_float64_reference(n_iterations, temp):
    logits = _logits()
    got = sinkhorn_knopp(logits.float(), temp, n_iterations)
    assert got.dtype == torch.float32
    want = torch.from_numpy(reference(logits.numpy(), temp, n_iterations))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_logits_that_overflow_float32_exp_stay_finite_and_correct():
    """t / tau up to 250: exp overflows float32 (above 88), not float64."""
    logits = 10.0 * torch.from_numpy(np.random.default_rng(1).uniform(size=(16, 8)))
    assert torch.isinf(torch.exp(logits.float() / 0.04)).any()
    got = sinkhorn_knopp(logits.float(), 0.04, 3)
    assert torch.isfinite(got).all()
    want = torch.from_numpy(reference(logits.numpy(), 0.04, 3))
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)


def test_rows_are_distributions_and_the_outputs_share_the_mass_equally():
    rows, K = 20, 4
    logits = _logits(rows, K, scale=2.0)
    for n in (1, 3):
        q = sinkhorn_knopp(logits.float(), 0.1, n)
        assert (q >= 0).all()
        torch.testing.assert_close(q.sum(1), torch.ones(rows), rtol=0, atol=1e-5)
    q = sinkhorn_knopp(logits.float(), 0.1, 500)  # converged
    torch.testing.assert_close(q.sum(0), torch.full((K,), rows / K), rtol=1e-4, atol=0)
    # A softmax of the same logits does not share the mass out equally.
    softmax_mass = torch.softmax(logits.float() / 0.1, dim=1).sum(0)
    assert (softmax_mass - rows / K).abs().max() > 0.5


def test_shifts_it_ignores_and_the_one_it_forgets_only_when_converged():
    """A constant per output (so any center) or one for all leaves the targets as they are:
    the first per-output normalisation removes it. A constant per image is only forgotten
    at convergence, which is why no per-image maximum is subtracted before exp."""
    logits = _logits(10, 6, scale=1.5).float()
    per_output = torch.randn(1, 6) * 5
    per_image = torch.randn(10, 1) * 5
    base = sinkhorn_knopp(logits, 0.2, 3)
    torch.testing.assert_close(sinkhorn_knopp(logits + per_output, 0.2, 3), base,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sinkhorn_knopp(logits - 40.0, 0.2, 3), base,
                               rtol=1e-5, atol=1e-6)
    # The reference agrees that a per-image shift matters after 3 iterations ...
    shifted = (logits + per_image).double().numpy()
    assert np.abs(reference(shifted, 0.2, 3) - base.double().numpy()).max() > 1e-3
    assert (sinkhorn_knopp(logits + per_image, 0.2, 3) - base).abs().max() > 1e-3
    # ... and not once converged.
    torch.testing.assert_close(sinkhorn_knopp(logits + per_image, 0.2, 300),
                               sinkhorn_knopp(logits, 0.2, 300), rtol=1e-4, atol=1e-6)


def test_bad_arguments_are_refused_with_the_reason():
    logits = _logits().float()
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.1, 0)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(logits, 0.0, 3)
    with pytest.raises(ValueError, match="K >= 2"):
        sinkhorn_knopp(logits[:, :1], 0.1, 3)


def _two_process_worker(rank: int, world: int, init_file: str, logits: torch.Tensor,
                        out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        half = logits.shape[0] // world
        out[rank] = sinkhorn_knopp(logits[rank * half:(rank + 1) * half], 0.1, 3)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 20 s on one core
def test_two_processes_balance_the_global_batch_as_one_does(tmp_path):
    """Each process holds half the rows; the per-output sums run over both, so the
    targets equal those of one process holding all rows (and differ from each half
    balanced alone)."""
    logits = _logits(16, 5, scale=2.0).float()
    with mp.get_context("spawn").Manager() as manager:  # no fork of a threaded process
        out = manager.dict()
        mp.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), logits, out),
                 nprocs=2, join=True)
        got = torch.cat([out[0], out[1]])
    torch.testing.assert_close(got, sinkhorn_knopp(logits, 0.1, 3), rtol=1e-5, atol=1e-6)
    alone = torch.cat([sinkhorn_knopp(logits[:8], 0.1, 3), sinkhorn_knopp(logits[8:], 0.1, 3)])
    assert (alone - got).abs().max() > 1e-3


def test_loss_from_probs_is_dino_loss_given_its_targets():
    torch.manual_seed(2)
    student, teacher, center = torch.randn(4 * 3, 7), torch.randn(2 * 3, 7), torch.randn(7)
    q = teacher_probs(teacher, center, 0.04)
    torch.testing.assert_close(
        dino_loss_from_probs(student, q, student_temp=0.1, n_global=2),
        dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04, n_global=2),
        rtol=0, atol=0)
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss_from_probs(student, q, student_temp=0.0)


def test_recipe_and_cli_check_the_centering_fields(tmp_path, capsys):
    assert SEED.centering == OFFICIAL.centering == "momentum"
    assert SEED.sinkhorn_iterations == OFFICIAL.sinkhorn_iterations == 3
    with pytest.raises(ConfigError,
                       match="--centering must be one of momentum, sinkhorn, got 'swav'"):
        OFFICIAL.replace(centering="swav").validate()
    with pytest.raises(ConfigError, match="--sinkhorn-iterations must be an integer of at"):
        OFFICIAL.replace(sinkhorn_iterations=0).validate()
    for flags, expected in ((["--centering", "swav"], "invalid choice: 'swav'"),
                            (["--sinkhorn-iterations", "0"], "--sinkhorn-iterations must")):
        with pytest.raises(SystemExit) if flags[0] == "--centering" else nullcontext():
            assert main(["run", *flags, "--out", str(tmp_path / "run")]) == 2
        assert expected in one_line_error(capsys.readouterr().err)


def test_trainer_in_sinkhorn_mode_trains_on_sinkhorn_targets(tiny_recipe, tiny_vit_cfg):
    """A few CPU steps give a finite loss and the diagnostics of balanced targets; the
    center, which Sinkhorn-Knopp ignores, does not change a thing (with momentum
    centering it changes the loss)."""
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8)
    recipe = tiny_recipe.replace(centering="sinkhorn", teacher_temp=0.1)
    runs = []
    for center in (None, 3.0 * torch.randn(1, recipe.out_dim)):
        trainer = tiny_trainer(recipe, tiny_vit_cfg)
        targets = []
        forward_backward = trainer._forward_backward

        def recording(crops, teacher_temp, *rest, fb=forward_backward, targets=targets):
            out = fb(crops, teacher_temp, *rest)
            targets.append((out[0].detach(), out[1], teacher_temp))
            return out

        trainer._forward_backward = recording
        if center is not None:
            trainer.center = center
        trainer.fit(images)
        runs.append((trainer, targets))
    (plain, plain_targets), (centred, _) = runs
    losses = [h["loss"] for h in plain.history]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [h["loss"] for h in centred.history] == losses
    for name, t in plain.student.state_dict().items():
        assert torch.equal(centred.student.state_dict()[name], t), name
    # The logged marginal entropy is the mean over the epoch's 3 steps of the entropy of
    # the batch-mean target, here from the float64 reference's targets; balanced columns
    # put it close to log K (16 outputs, 16 rows a step, 3 iterations).
    assert len(plain_targets) == 6 and len(plain.history) == 2
    for epoch, rec in enumerate(plain.history):
        assert {"teacher_entropy", "marginal_entropy", "kl", "outputs_used"} <= set(rec)
        entropies = []
        for teacher_out, _, temp in plain_targets[3 * epoch:3 * epoch + 3]:
            mean = reference(teacher_out.double().numpy(), temp,
                             recipe.sinkhorn_iterations).mean(0)
            entropies.append(-np.sum(mean * np.log(mean)))
        assert rec["marginal_entropy"] == pytest.approx(np.mean(entropies), rel=1e-5)
        assert rec["log_k"] == pytest.approx(np.log(recipe.out_dim))
        assert rec["marginal_entropy"] == pytest.approx(rec["log_k"], abs=1e-4)
    # The targets the loss used are Sinkhorn-Knopp's of the teacher's logits, as the
    # float64 reference computes them.
    teacher_out, q, _ = plain_targets[0]
    expected = reference(teacher_out.double().numpy(), 0.1, recipe.sinkhorn_iterations)
    torch.testing.assert_close(q.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)

    momentum = tiny_recipe.replace(teacher_temp=0.1)
    shifted = tiny_trainer(momentum, tiny_vit_cfg)
    shifted.center = 3.0 * torch.randn(1, momentum.out_dim)
    shifted.fit(images)
    unshifted = tiny_trainer(momentum, tiny_vit_cfg)
    unshifted.fit(images)
    assert shifted.history[0]["loss"] != unshifted.history[0]["loss"]
