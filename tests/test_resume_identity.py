"""What `--resume` compares before it reuses a finished run's rows or continues its
checkpoint: the labelled split, the evaluation cadence and the time budget, each of which
changes the rows a run writes."""

from __future__ import annotations

import json

import pytest

from dinobench import checkpoint
from dinobench.checkpoint import CheckpointError
from dinobench.dino.train import DINOTrainer
from dinobench.run import UNKNOWN, RunOptions, check_budget_covers, run

TINY = dict(depth=1, dim=32, heads=2, mlp_dim=64, batch_size=128, n_local=2, epochs=2)


def _opts(out, **kw) -> RunOptions:
    return RunOptions(datasets=["digits"], seeds=[0], out=out, progress=False, probe=False,
                      attention_images=2, label_budgets=(), overrides=TINY, **kw)


def _rows(out) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def _records(out) -> list[dict]:
    return [json.loads(line) for line in
            (out / "train_digits_seed0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny digits run, no budget, the default cadence."""
    out = tmp_path_factory.mktemp("finished") / "r"
    run(_opts(out), log=lambda m: None)
    return out


@pytest.mark.parametrize(("change", "named"), [
    # Fewer labelled images: the k-NN bank and validation split change, the pre-training
    # images (every train image) do not.
    (dict(labels_per_class=5), "labelled"),
    (dict(eval_every=2), "eval_every"),  # the curve's cadence (the quick default: 1)
])
def test_a_change_the_rows_depend_on_is_refused(finished, change, named):
    before = (finished / "results.json").read_bytes()
    with pytest.raises(CheckpointError, match=f"{named}.*--restart"):
        run(_opts(finished, resume=True, **change), log=lambda m: None)
    assert (finished / "results.json").read_bytes() == before


def test_the_same_flags_reuse_the_rows(finished):
    before = (finished / "results.json").read_bytes()
    lines = []
    run(_opts(finished, resume=True, eval_every=1), log=lines.append)  # 1: the default
    assert any("finished earlier, rows reused" in line for line in lines)
    rows = {(r["model"], r["metric"]): r["value"] for r in _rows(finished)}
    old = {(r["model"], r["metric"]): r["value"]
           for r in json.loads(before)["rows"]}
    assert rows == old


def test_an_identity_written_before_the_cadence_entered_it_still_resumes(tmp_path):
    """A finished unit saved by a dinobench whose identity had no "eval_every" (nor
    "labelled"): the same flags reuse its rows, as they did when it was written."""
    out = tmp_path / "r"
    run(_opts(out, eval_every=2), log=lambda m: None)
    done = out / "checkpoints" / "digits_seed0.done.json"
    record = json.loads(done.read_text())
    assert record["identity"]["eval_every"] == 2
    del record["identity"]["eval_every"]
    done.write_text(json.dumps(record))
    lines = []
    run(_opts(out, resume=True, eval_every=2), log=lines.append)
    assert any("finished earlier, rows reused" in line for line in lines)


@pytest.mark.parametrize(("trained", "budget", "ran_under", "refused"), [
    (61.2, None, 60.0, False),  # no budget: nothing to exceed
    (20.0, 30.0, 60.0, False),  # a budget that covers the training done
    (61.2, 60.0, 60.0, False),  # the same budget, passed by its last step: goes on as it would
    (61.2, 30.0, 60.0, True),   # under the training another budget allowed
    (61.2, 30.0, None, True),   # under the training no budget allowed
    (61.2, 30.0, UNKNOWN, False),  # a checkpoint from before budgets were saved: as before
])
def test_a_budget_under_the_training_done_under_another_is_refused(trained, budget,
                                                                  ran_under, refused):
    if not refused:
        check_budget_covers("ck.pt", trained, budget, ran_under)
        return
    with pytest.raises(CheckpointError, match=r"^cannot resume from ck\.pt: it has trained "
                       r"61\.2 s under .*, more than --budget-seconds 30; resume with "
                       r"--budget-seconds 62 or more, or start over with --restart$"):
        check_budget_covers("ck.pt", trained, budget, ran_under)


def test_a_larger_budget_continues_a_cut_run_and_a_smaller_one_is_refused(tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "r"
    run(_opts(out, budget_seconds=1e-6), log=lambda m: None)  # cut after its first step
    cut = _records(out)
    assert len(cut) == 1 and cut[0]["budget_stop"] and cut[0]["step"] == 1
    assert cut[0]["budget_seconds"] == 1e-6
    ckpt = out / "checkpoints" / "digits_seed0.pt"
    assert checkpoint.load(ckpt)["trainer"]["budget_seconds"] == 1e-6
    assert all(r["budget_seconds"] == 1e-6 and r["budget_stop"] for r in _rows(out)
               if r["model"] == "dino-small")

    # The same budget: the rows as they were.
    lines = []
    run(_opts(out, resume=True, budget_seconds=1e-6), log=lines.append)
    assert any("finished earlier, rows reused" in line for line in lines)

    # No budget: training goes on from the cut to the planned 2 epochs (1,347
    # pre-training images at batch 128: 10 full steps an epoch), and the rows say so.
    # The old rows are gone while it trains, so a stopped continuation cannot reuse them.
    done = out / "checkpoints" / "digits_seed0.done.json"
    seen, fit = [], DINOTrainer.fit

    def spy(self, images, **kw):
        seen.append(done.exists())
        return fit(self, images, **kw)

    monkeypatch.setattr(DINOTrainer, "fit", spy)
    lines = []
    run(_opts(out, resume=True), log=lines.append)
    assert seen == [False] and done.exists()
    assert any("continuing from its checkpoint under no time budget" in line
               for line in lines)
    records = _records(out)
    assert records[0] == cut[0]  # the cut's record kept, then the rest of the epochs
    assert [r["step"] for r in records] == [1, 10, 20]
    dino = [r for r in _rows(out) if r["model"] == "dino-small"]
    assert dino and not any("budget_seconds" in r for r in dino)

    # A budget under the training the state has had would claim what it did not do.
    before = (out / "results.json").read_bytes()
    with pytest.raises(CheckpointError, match="under no time budget, more than "
                       "--budget-seconds 1e-06; resume with --budget-seconds [0-9]+ or more"):
        run(_opts(out, resume=True, budget_seconds=1e-6), log=lambda m: None)
    assert (out / "results.json").read_bytes() == before


def test_another_budget_without_the_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    run(_opts(out, budget_seconds=1e-6), log=lambda m: None)
    (out / "checkpoints" / "digits_seed0.pt").unlink()
    with pytest.raises(CheckpointError, match="no time budget.*is gone.*--restart"):
        run(_opts(out, resume=True), log=lambda m: None)
