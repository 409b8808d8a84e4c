"""cosine_schedule and teacher_temp_schedule against pure-Python formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dinobench.dino.schedules import cosine_schedule, teacher_temp_schedule


def reference_cosine(base, final, total, warmup, warmup_start):
    """The documented schedule, one value at a time with math.cos."""
    values = []
    for j in range(warmup):
        frac = j / (warmup - 1) if warmup > 1 else 0.0
        values.append(warmup_start + (base - warmup_start) * frac)
    n = total - warmup
    for i in range(n):
        values.append(final + (base - final) * (1 + math.cos(math.pi * i / n)) / 2)
    return values


@pytest.mark.parametrize("base,final,total,warmup,start", [
    (5e-4, 1e-6, 100, 10, 0.0),
    (0.996, 1.0, 37, 0, 0.0),     # teacher momentum: rises towards 1
    (0.04, 0.4, 50, 0, 0.0),      # weight decay
    (1.0, 0.0, 7, 3, 0.25),       # non-zero warm-up start
    (1.0, 0.0, 5, 5, 0.0),        # all warm-up
    (1.0, 0.5, 1, 0, 0.0),        # a single step: the base
    (1.0, 0.5, 2, 1, 0.2),        # one warm-up value: the warm-up start
])
def test_cosine_matches_python_loop(base, final, total, warmup, start):
    """Length total_steps, float64, value by value equal to the math.cos loop."""
    got = cosine_schedule(base, final, total, warmup, start)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert got.shape == (total,)
    np.testing.assert_allclose(got, reference_cosine(base, final, total, warmup, start),
                               rtol=1e-12, atol=1e-15)


def test_warmup_endpoints():
    """Warm-up starts at warmup_start and its last value is base; the decay then starts
    at base too, and the last value approaches (never passes) final."""
    s = cosine_schedule(2.0, 0.1, 20, 5, warmup_start=0.5)
    assert s[0] == 0.5
    assert s[4] == pytest.approx(2.0)
    assert s[5] == pytest.approx(2.0)
    assert 0.1 < s[-1] < 0.1 + 0.05
    assert np.all(np.diff(s[:5]) > 0)  # linear rise


def test_monotone_decay_after_warmup():
    """The cosine part decays monotonically from base to final (or rises, for momentum)."""
    down = cosine_schedule(1.0, 0.0, 40, 8)[8:]
    assert np.all(np.diff(down) < 0)
    assert down.max() <= 1.0 and down.min() >= 0.0
    up = cosine_schedule(0.996, 1.0, 40)
    assert np.all(np.diff(up) > 0) and up[0] == pytest.approx(0.996) and up[-1] < 1.0


def test_cosine_midpoint_is_halfway():
    """At i = n/2 the half-cosine is exactly half-way between base and final."""
    s = cosine_schedule(3.0, 1.0, 10)
    assert s[5] == pytest.approx(2.0)


def test_zero_length():
    """No steps gives an empty schedule, not an error."""
    assert cosine_schedule(1.0, 0.0, 0).shape == (0,)
    assert cosine_schedule(1.0, 0.0, 0, 0, 0.3).shape == (0,)


def test_warmup_longer_than_total_rejected():
    """A warm-up longer than the run cannot be honoured: an error, not a truncation."""
    with pytest.raises(ValueError, match="warmup"):
        cosine_schedule(1.0, 0.0, 5, 6)


@pytest.mark.parametrize("total,warmup", [(-1, 0), (5, -1)])
def test_negative_steps_rejected(total, warmup):
    """Negative step counts are an error rather than an empty schedule."""
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total, warmup)


def test_teacher_temp_warmup_then_constant():
    """DINO's tau_t: 0.04 rising linearly to 0.07 over 30 epochs, then constant."""
    s = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert s.shape == (100,)
    want = [0.04 + (0.07 - 0.04) * e / 29 for e in range(30)] + [0.07] * 70
    np.testing.assert_allclose(s, want, rtol=1e-12)


def test_teacher_temp_no_warmup_is_constant():
    """warmup_epochs 0 (the seed recipe): tau_t is constant from the first epoch."""
    np.testing.assert_array_equal(teacher_temp_schedule(0.05, 0.05, 0, 7), [0.05] * 7)
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 0, 3), [0.07] * 3)


def test_teacher_temp_run_shorter_than_warmup_follows_the_same_ramp():
    """A run shorter than the warm-up follows the documented ramp ("linear from
    warmup_temp to temp over warmup_epochs epochs") and stops part-way: a 10-epoch run
    with a 30-epoch warm-up sees the first 10 values of the 30-epoch ramp, not a ramp
    squeezed into 10 epochs that reaches 0.07 three times too fast."""
    full = teacher_temp_schedule(0.04, 0.07, 30, 30)
    short = teacher_temp_schedule(0.04, 0.07, 30, 10)
    assert short.shape == (10,)
    np.testing.assert_allclose(short, full[:10], rtol=1e-12)
