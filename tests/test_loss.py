"""dino_loss (DINO Eq. 3, Algorithm 1) against a float64 loop over view pairs and samples."""

from __future__ import annotations

import math

import pytest
import torch

from dinobench.dino.loss import dino_loss, entropy, teacher_probs

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reference_loss(student, teacher, center, student_temp, teacher_temp, n_global):
    """The loss written out element by element in float64: for every teacher view i and
    student view v != i, the batch mean of sum_k -q_k log p_k; then the mean over pairs."""
    s = student.double()
    t = teacher.detach().double()
    c = center.detach().double().reshape(-1)
    K = t.shape[1]
    B = t.shape[0] // n_global
    n_crops = s.shape[0] // B
    pair_losses = []
    for i in range(n_global):
        for v in range(n_crops):
            if v == i:
                continue
            total = s.new_zeros(())
            for b in range(B):
                tz = [(t[i * B + b, k] - c[k]) / teacher_temp for k in range(K)]
                t_max = max(float(z) for z in tz)
                t_norm = sum(math.exp(float(z) - t_max) for z in tz)
                q = [math.exp(float(z) - t_max) / t_norm for z in tz]  # constants: no gradient
                sz = s[v * B + b] / student_temp
                log_p = sz - torch.logsumexp(sz, dim=0)
                total = total - sum(q[k] * log_p[k] for k in range(K))
            pair_losses.append(total / B)
    return sum(pair_losses) / len(pair_losses)


def make_logits(n_crops, n_global, B, K, dtype=torch.float32, scale=3.0):
    student = scale * torch.randn(n_crops * B, K, dtype=dtype)
    teacher = scale * torch.randn(n_global * B, K, dtype=dtype)
    center = torch.randn(K, dtype=dtype)
    return student, teacher, center


@pytest.mark.parametrize("n_crops,n_global", [(4, 2), (3, 2), (3, 1), (2, 1), (2, 2)])
@pytest.mark.parametrize("center_shape", ["K", "1K"])
def test_loss_matches_float64_loop(n_crops, n_global, center_shape):
    """The vectorised loss equals the pair-by-pair float64 loop, including one local crop
    (n_crops=3), a single teacher view (n_global=1) and globals only (n_crops=n_global)."""
    B, K = 3, 5
    student, teacher, center = make_logits(n_crops, n_global, B, K)
    if center_shape == "1K":
        center = center.reshape(1, K)
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04,
                    n_global=n_global)
    want = reference_loss(student, teacher, center, 0.1, 0.04, n_global)
    assert got.dtype == torch.float32
    assert got.shape == ()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_center_shapes_agree():
    """A (K,) center and the same values as (1, K) give the same loss."""
    student, teacher, center = make_logits(4, 2, 2, 6)
    a = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.05)
    b = dino_loss(student, teacher, center.reshape(1, -1), student_temp=0.1, teacher_temp=0.05)
    assert torch.equal(a, b)


def test_center_is_subtracted():
    """A center far from zero on one output changes the teacher target, hence the loss
    (a loss that ignored the center would not notice)."""
    student, teacher, center = make_logits(4, 2, 2, 6)
    a = dino_loss(student, teacher, torch.zeros(6), student_temp=0.1, teacher_temp=0.05)
    c = torch.zeros(6)
    c[0] = -20.0  # subtracting it lifts output 0 above every other teacher logit
    b = dino_loss(student, teacher, c, student_temp=0.1, teacher_temp=0.05)
    want = reference_loss(student, teacher, c, 0.1, 0.05, 2)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b.double(), want, rtol=1e-5, atol=1e-5)


def test_gradient_matches_float64_autograd():
    """d loss / d student_logits equals autograd through the float64 loop reference."""
    n_crops, n_global, B, K = 4, 2, 2, 5
    student, teacher, center = make_logits(n_crops, n_global, B, K)
    s32 = student.clone().requires_grad_(True)
    dino_loss(s32, teacher, center, student_temp=0.2, teacher_temp=0.05).backward()
    s64 = student.double().requires_grad_(True)
    reference_loss(s64, teacher, center, 0.2, 0.05, n_global).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
    """The teacher is trained by EMA only: a teacher tensor that requires grad receives
    none, and neither does the center."""
    student, teacher, center = make_logits(4, 2, 2, 5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    center.requires_grad_(True)
    dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert center.grad is None


def test_teacher_only_requires_grad_has_no_graph():
    """With only the teacher requiring grad, the loss carries no graph at all."""
    student, teacher, center = make_logits(3, 2, 2, 5)
    teacher.requires_grad_(True)
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert not loss.requires_grad


def test_bf16_inputs_give_float32_close_to_reference():
    """bf16 logits (as under autocast) give a float32 loss equal to the float64 loss of
    the same bf16-rounded values."""
    student, teacher, center = make_logits(4, 2, 3, 8, dtype=torch.bfloat16)
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert got.dtype == torch.float32
    want = reference_loss(student, teacher, center, 0.1, 0.04, 2)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [2, 7, 50])
def test_uniform_student_gives_log_k(K):
    """Hand-derived: a uniform student puts log p_k = -log K on every output, so the
    cross-entropy is log K whatever the teacher."""
    B = 3
    student = torch.full((4 * B, K), 1.7)  # equal logits in every row
    teacher = 10 * torch.randn(2 * B, K)
    center = torch.randn(K)
    got = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert got.item() == pytest.approx(math.log(K), rel=1e-6)


def test_hand_derived_two_outputs():
    """n_global=1, one extra crop, K=2: a uniform teacher q=(1/2, 1/2) against a student
    p=(3/4, 1/4) gives -(log 3/4 + log 1/4)/2 = log 4 - log(3)/2. Student crop 0 is the
    teacher's own view and must be left out, so its (extreme) logits cannot matter."""
    student = torch.tensor([[100.0, -100.0], [math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.3, 0.3]])
    got = dino_loss(student, teacher, torch.zeros(2), student_temp=1.0, teacher_temp=0.5,
                    n_global=1)
    assert got.item() == pytest.approx(math.log(4.0) - 0.5 * math.log(3.0), rel=1e-5)


def test_loss_is_at_least_teacher_entropy():
    """Gibbs: cross-entropy >= entropy of the teacher, with equality when every student
    view equals the teacher target (same logits, same temperature, zero center)."""
    B, K = 4, 6
    teacher = torch.randn(2 * B, K)
    # Student view 1 equals teacher view 0 and vice versa; views 2, 3 repeat them, so
    # some pairs match exactly and others do not: only the bound holds.
    student = torch.cat([teacher[B:], teacher[:B], teacher[B:], teacher[:B]])
    loss = dino_loss(student, teacher, torch.zeros(K), student_temp=0.3, teacher_temp=0.3)
    h = entropy(teacher_probs(teacher, torch.zeros(K), 0.3))
    assert loss.item() >= h.item() - 1e-6
    # n_global=1: the teacher's target for every student view is itself.
    t1 = teacher[:B]
    loss1 = dino_loss(torch.cat([t1, t1, t1]), t1, torch.zeros(K), student_temp=0.3,
                      teacher_temp=0.3, n_global=1)
    h1 = entropy(teacher_probs(t1, torch.zeros(K), 0.3))
    assert loss1.item() == pytest.approx(h1.item(), rel=1e-5)


def test_k1_rejected():
    """A softmax over one output is constant: K=1 is an error, not a silent zero loss."""
    with pytest.raises(ValueError, match="K"):
        dino_loss(torch.zeros(4, 1), torch.zeros(2, 1), torch.zeros(1), student_temp=0.1,
                  teacher_temp=0.04, n_global=1)


@pytest.mark.parametrize("student_temp,teacher_temp", [(0.0, 0.04), (-0.1, 0.04),
                                                       (0.1, 0.0), (0.1, -0.04)])
def test_non_positive_temperatures_rejected(student_temp, teacher_temp):
    """Zero or negative temperatures would divide by zero or flip the softmax."""
    student, teacher, center = make_logits(4, 2, 2, 5)
    with pytest.raises(ValueError, match="temp"):
        dino_loss(student, teacher, center, student_temp=student_temp,
                  teacher_temp=teacher_temp)


@pytest.mark.parametrize("student_shape,teacher_shape,center_shape,n_global", [
    ((8, 5), (4, 6), (5,), 2),     # K differs between student and teacher
    ((8, 5), (4, 5), (6,), 2),     # center has the wrong K
    ((8, 5), (4, 5), (2, 5), 2),   # center holds two rows
    ((8, 5), (5, 5), (5,), 2),     # teacher rows not a multiple of n_global
    ((7, 5), (4, 5), (5,), 2),     # student rows not a multiple of the batch size
    ((2, 5), (4, 5), (5,), 2),     # fewer student crops than teacher views
    ((2, 5), (2, 5), (5,), 1),     # one crop, one view: no pair v != i
    ((8,), (4, 5), (5,), 2),       # student not 2-D
    ((8, 5), (0, 5), (5,), 2),     # empty teacher
    ((8, 5), (4, 5), (5,), 0),     # no teacher view
])
def test_mismatched_shapes_rejected(student_shape, teacher_shape, center_shape, n_global):
    """Inconsistent shapes raise ValueError instead of broadcasting into a wrong number."""
    with pytest.raises(ValueError):
        dino_loss(torch.randn(student_shape), torch.randn(teacher_shape),
                  torch.randn(center_shape), student_temp=0.1, teacher_temp=0.04,
                  n_global=n_global)


@pytest.mark.gpu
@requires_cuda
def test_cuda_bf16_loss_and_gradient():
    """Same checks on CUDA: bf16 inputs give a float32 loss equal to the float64 loop, and
    the student gradient matches float64 autograd."""
    student, teacher, center = make_logits(4, 2, 3, 8, dtype=torch.bfloat16)
    s = student.cuda().requires_grad_(True)
    t = teacher.cuda().requires_grad_(True)
    got = dino_loss(s, t, center.cuda(), student_temp=0.1, teacher_temp=0.04)
    assert got.dtype == torch.float32 and got.is_cuda
    got.backward()
    s64 = student.double().requires_grad_(True)
    want = reference_loss(s64, teacher, center, 0.1, 0.04, 2)
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)
    assert t.grad is None
    torch.testing.assert_close(s.grad.double().cpu(), s64.grad, rtol=2e-2, atol=1e-3)
