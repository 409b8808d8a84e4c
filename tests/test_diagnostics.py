"""Collapse diagnostics tell a sharp, healthy teacher from the two collapses.

Three synthetic batches of teacher targets (K = 6, B = 12 images):

- one output: every image one-hot on output 2, the student agreeing;
- uniform: every target uniform but for a tiny bump (so the argmax varies), the student
  agreeing;
- healthy: every image one-hot, on different outputs (each output twice), the student
  not yet agreeing.

Each diagnostic is checked against values derived by hand or written out in float64 with
``math``, and ``collapse_reason`` flags exactly the two collapses.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinobench.dino.diagnostics import (
    argmax_counts,
    kl_divergence,
    marginal_entropy,
    outputs_used,
    pairwise_kl,
    teacher_entropy,
)
from dinobench.dino.faults import collapse_reason
from dinobench.dino.loss import dino_loss_from_probs
from dinobench.dino.multicrop import MultiCropConfig
from dinobench.dino.train import DINOTrainer

K, B = 6, 12
LOG_K = math.log(K)
STUDENT_TEMP = 0.1
BUMP = 1e-3  # the uniform teacher's tiny preference for one output per image


def _one_hot_rows(outputs):
    q = torch.zeros(len(outputs), K, dtype=torch.float64)
    q[torch.arange(len(outputs)), torch.tensor(outputs)] = 1.0
    return q


def one_output():
    q = _one_hot_rows([2] * B)
    student = 10.0 * q  # softmax(student / 0.1) puts 1 - 5e-43 on output 2
    return q, student


def uniform():
    # Teacher logits BUMP * onehot(b mod K) at temperature 1, the student equal to them.
    logits = BUMP * _one_hot_rows([b % K for b in range(B)])
    return torch.softmax(logits, dim=-1), logits * STUDENT_TEMP


def healthy():
    q = _one_hot_rows([b % K for b in range(B)])
    student = torch.zeros(B, K, dtype=torch.float64)  # uniform student: KL = log K a row
    return q, student


def _entropy64(row):
    return -sum(p * math.log(p) for p in row if p > 0)


def _kl64(q_row, student_row):
    z = [s / STUDENT_TEMP for s in student_row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(x - m) for x in z))
    return sum(q * (math.log(q) - (x - log_norm)) for q, x in zip(q_row, z) if q > 0)


def _brute_force(q, student):
    """The diagnostics written out row by row in float64 Python floats."""
    rows, s_rows = q.tolist(), student.tolist()
    n_out = len(rows[0])
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(n_out)]
    return {
        "teacher_entropy": sum(_entropy64(r) for r in rows) / len(rows),
        "marginal_entropy": _entropy64(mean),
        "kl": sum(_kl64(r, s) for r, s in zip(rows, s_rows)) / len(rows),
        "outputs_used": len({max(range(n_out), key=lambda k, r=r: r[k]) for r in rows}),
    }


def _diagnostics(q, student):
    return {"teacher_entropy": float(teacher_entropy(q)),
            "marginal_entropy": float(marginal_entropy(q)),
            "kl": float(kl_divergence(q, student, STUDENT_TEMP)),
            "outputs_used": outputs_used(q)}


# Values derived by hand. The uniform teacher's rows are softmax(BUMP * e_j): one entry
# a = e^BUMP / (e^BUMP + K - 1), K - 1 entries b = 1 / (e^BUMP + K - 1); its batch mean is
# exactly uniform (every output bumped in B / K rows), and the student equals it (KL 0).
_A = math.exp(BUMP) / (math.exp(BUMP) + K - 1)
_B = 1 / (math.exp(BUMP) + K - 1)
BY_HAND = {
    "one output": {"teacher_entropy": 0.0, "marginal_entropy": 0.0,
                   "kl": math.log(1 + (K - 1) * math.exp(-100.0)), "outputs_used": 1},
    "uniform": {"teacher_entropy": -_A * math.log(_A) - (K - 1) * _B * math.log(_B),
                "marginal_entropy": LOG_K, "kl": 0.0, "outputs_used": K},
    "healthy": {"teacher_entropy": 0.0, "marginal_entropy": LOG_K, "kl": LOG_K,
                "outputs_used": K},
}
CASES = {"one output": one_output, "uniform": uniform, "healthy": healthy}


@pytest.mark.parametrize("name", list(CASES))
def test_diagnostics_match_hand_derived_and_float64_values(name):
    q, student = CASES[name]()
    got = _diagnostics(q, student)
    brute = _brute_force(q, student)
    for key, want in BY_HAND[name].items():
        assert got[key] == pytest.approx(want, abs=1e-12), (name, key)
        assert brute[key] == pytest.approx(want, abs=1e-12), (name, key)
    # float32 inputs, as the trainer passes them, agree to float32 precision.
    got32 = _diagnostics(q.float(), student.float())
    for key, want in BY_HAND[name].items():
        assert got32[key] == pytest.approx(want, abs=1e-5), (name, key)


def test_the_sharp_teacher_and_the_collapsed_one_differ_only_in_the_marginal():
    """The reason per-image entropy cannot judge collapse: both are 0."""
    collapsed, _ = one_output()
    sharp, _ = healthy()
    assert float(teacher_entropy(collapsed)) == float(teacher_entropy(sharp)) == 0.0
    assert float(marginal_entropy(collapsed)) == 0.0
    assert float(marginal_entropy(sharp)) == pytest.approx(LOG_K, abs=1e-12)


def test_argmax_counts_count_rows_per_output():
    q = _one_hot_rows([0, 3, 3, 5, 3])
    assert argmax_counts(q).tolist() == [1, 0, 0, 3, 0, 1]
    assert argmax_counts(q).dtype == torch.long
    assert outputs_used(q) == 3


def test_pairwise_kl_is_the_dino_loss_minus_the_target_entropy():
    """What the trainer logs as kl (loss - mean target entropy) is the mean over view
    pairs (i, v != i) of KL(teacher i || student v), brute-forced in float64."""
    torch.manual_seed(1)
    n_global, n_crops, b = 2, 4, 3
    q = torch.softmax(torch.randn(n_global * b, K, dtype=torch.float64) / 0.3, dim=-1)
    student = torch.randn(n_crops * b, K, dtype=torch.float64)
    pairs = [_kl64(q[i * b + j].tolist(), student[v * b + j].tolist())
             for i in range(n_global) for v in range(n_crops) if v != i for j in range(b)]
    want = sum(pairs) / len(pairs)
    assert float(pairwise_kl(q, student, STUDENT_TEMP, n_global)) == pytest.approx(want,
                                                                                  rel=1e-10)
    logged = dino_loss_from_probs(student, q, student_temp=STUDENT_TEMP, n_global=n_global)
    assert float(logged) - float(teacher_entropy(q)) == pytest.approx(want, rel=1e-5)


def _history(diagnostics, epochs=3):
    return [dict(diagnostics, log_k=LOG_K) for _ in range(epochs)]


def test_collapse_reason_flags_exactly_the_two_collapses():
    reasons = {name: collapse_reason(_history(_diagnostics(*make())))
               for name, make in CASES.items()}
    assert "one output" in reasons["one output"]
    assert "uniform" in reasons["uniform"]
    assert reasons["healthy"] is None


def test_a_sharp_teacher_the_student_has_caught_up_with_is_not_collapse():
    """Per image as sharp as a collapse and KL near 0, but spread over every output."""
    q, _ = healthy()
    diagnostics = _diagnostics(q, 10.0 * q)
    assert diagnostics["kl"] < 1e-12
    assert collapse_reason(_history(diagnostics)) is None


def test_a_collapse_the_student_has_not_followed_yet_is_not_flagged_yet():
    q, _ = one_output()
    assert collapse_reason(_history(_diagnostics(q, torch.zeros(B, K)))) is None


def test_only_the_last_epochs_count():
    collapsed = _diagnostics(*one_output())
    fine = _diagnostics(*healthy())
    history = _history(collapsed, 3) + _history(fine, 1)  # collapsed early, then learned
    assert collapse_reason(history) is None
    history = _history(fine, 3) + _history(collapsed, 3)
    assert "one output" in collapse_reason(history)
    assert collapse_reason(_history(collapsed, 1)) is not None  # shorter than patience
    assert collapse_reason([]) is None


def test_records_without_the_marginal_judge_uniform_collapse_only():
    """Histories from before marginal_entropy was logged: a per-image entropy near 0 is
    no longer called a collapse (it may be a healthy teacher); near log K still is."""
    old_sharp = [{"teacher_entropy": 0.01, "kl": 0.0, "log_k": LOG_K}] * 3
    old_uniform = [{"teacher_entropy": LOG_K, "kl": 0.0, "log_k": LOG_K}] * 3
    no_kl_uniform = [{"teacher_entropy": LOG_K, "log_k": LOG_K}] * 3
    assert collapse_reason(old_sharp) is None
    assert "uniform" in collapse_reason(old_uniform)
    assert "uniform" in collapse_reason(no_kl_uniform)


def _cross_entropy64(q_row, student_row):
    """sum_k -q_k log softmax(student / STUDENT_TEMP)_k in float64 Python floats."""
    z = [s / STUDENT_TEMP for s in student_row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(x - m) for x in z))
    return -sum(q * (x - log_norm) for q, x in zip(q_row, z))


def _teacher_probs64(teacher_row, center_row, temp):
    z = [(t - c) / temp for t, c in zip(teacher_row, center_row)]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _pairs64(q, student, n_global):
    """The DINO loss and KL(teacher || student), each averaged over every pair (teacher
    view i, student view v != i) and the batch, crop-major rows, in float64 floats."""
    b = len(q) // n_global
    n_crops = len(student) // b
    pairs = [(i * b + j, v * b + j) for i in range(n_global) for v in range(n_crops)
             if v != i for j in range(b)]
    loss = sum(_cross_entropy64(q[t], student[s]) for t, s in pairs) / len(pairs)
    kl = sum(_kl64(q[t], student[s]) for t, s in pairs) / len(pairs)
    return loss, kl


def test_trainer_history_sums_the_diagnostics_of_every_step(tiny_recipe, tiny_vit_cfg):
    """Each epoch's record against the teacher and student logits of every step, the
    targets and the loss recomputed from them in float64 here: means over the epoch's
    steps, argmaxes over the epoch (reset each epoch)."""
    assert STUDENT_TEMP == tiny_recipe.student_temp
    crop = MultiCropConfig.from_recipe(tiny_recipe, 16, 4, (0.5,), (0.25,))
    trainer = DINOTrainer(tiny_recipe, tiny_vit_cfg, crop, seed=1, progress=False,
                          log=lambda m: None)
    steps = []
    forward_backward, student_fwd = trainer._forward_backward, trainer.student_fwd

    def recording(crops, teacher_temp, *rest):
        center = trainer.center.detach().double().reshape(-1).tolist()
        out = forward_backward(crops, teacher_temp, *rest)
        steps[-1].update(teacher=out[0].detach().double().tolist(), center=center,
                         temp=teacher_temp, targets=out[1].detach().double().clone())
        return out

    def student(*args, **kwargs):
        out = student_fwd(*args, **kwargs)
        steps.append({"student": out.detach().double().tolist()})
        return out

    trainer._forward_backward, trainer.student_fwd = recording, student
    images = torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8)
    trainer.fit(images)  # 2 epochs of 3 steps
    assert len(steps) == 6 and len(trainer.history) == 2
    n_global = tiny_recipe.n_global
    for step in steps:
        step["q"] = [_teacher_probs64(t, step["center"], step["temp"])
                     for t in step["teacher"]]
        # The targets the trainer used are the float64 softmax of the centred logits.
        torch.testing.assert_close(step["targets"], torch.tensor(step["q"],
                                                                 dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)
        step["loss"], step["kl"] = _pairs64(step["q"], step["student"], n_global)
    for epoch, rec in enumerate(trainer.history):
        epoch_steps = steps[3 * epoch:3 * epoch + 3]
        brute = [_brute_force(q, torch.zeros_like(q)) for q in
                 (torch.tensor(s["q"], dtype=torch.float64) for s in epoch_steps)]
        for key in ("teacher_entropy", "marginal_entropy"):
            want = sum(b[key] for b in brute) / len(brute)
            assert rec[key] == pytest.approx(want, rel=1e-5), (epoch, key)
        for key in ("loss", "kl"):
            want = sum(s[key] for s in epoch_steps) / len(epoch_steps)
            assert rec[key] == pytest.approx(want, rel=1e-5), (epoch, key)
        used = {max(range(len(r)), key=lambda k, r=r: r[k])
                for s in epoch_steps for r in s["q"]}
        assert rec["outputs_used"] == len(used)
        assert rec["log_k"] == pytest.approx(math.log(tiny_recipe.out_dim))
