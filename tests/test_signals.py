"""Ctrl-C: the first SIGINT (or SIGTERM) asks the run to stop at the next step and save;
a second SIGINT interrupts at once, exit code 130, without saving the step it cut."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dinobench.signals import StopOnSignal
from helpers import one_line_error, popen, trainer_state, wait_for_epochs


def _ask(sig: int) -> None:
    """Send ``sig`` to this process, expecting it only to be noted (an interrupt here
    would otherwise end the whole test session, not fail this test)."""
    try:
        os.kill(os.getpid(), sig)
    except KeyboardInterrupt:
        pytest.fail(f"signal {sig} interrupted; only a second SIGINT should")


def test_first_signal_sets_the_flag_and_a_second_sigint_raises():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        # Installed (else the signals below would end this process, not fail the test).
        assert signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, before[0])
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before[1])
        assert not stop.requested()
        _ask(signal.SIGTERM)
        assert stop.requested() and stop.signum == signal.SIGTERM
        _ask(signal.SIGTERM)  # a second SIGTERM still only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopOnSignal() as stop:
        _ask(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_a_second_sigint_stops_the_run_at_once(tmp_path):
    """One step per epoch, each over a second long (1.3 s on one core): both signals
    land inside the second epoch's step. The first alone would let that step finish and
    save it, then stop with a "checkpoint saved" line."""
    out = tmp_path / "run"
    proc = popen("run", "--depth", "2", "--dim", "64", "--heads", "2", "--mlp-dim", "128",
                 "--batch-size", "1024", "--n-local", "2", "--no-progress", "--epochs", "5",
                 "--no-probe", "--eval-every", "0", "--checkpoint-every", "1",
                 "--out", str(out))
    log = out / "train_digits_seed0.jsonl"
    wait_for_epochs(log, 1, proc)
    time.sleep(0.1)  # past the step boundary, into the second epoch's only step
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals, not one the handler would see once
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert one_line_error(stderr) == "dinobench: interrupted"
    # Nothing saved after the first epoch: the step in flight was cut, not finished.
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]
    state = trainer_state(out)
    assert (state["epoch"], state["step"]) == (1, 1)
    assert not (out / "results.json").exists()
