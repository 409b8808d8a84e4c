"""What `--resume` compares before it reuses a finished run's rows or continues its
checkpoint: the labelled split, the evaluation cadence and the time budget, each of which
changes the rows a run writes."""

from __future__ import annotations

import json

import pytest

from dinobench.checkpoint import CheckpointError
from dinobench.run import RunOptions, run

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


def test_a_larger_budget_continues_a_cut_run_and_a_smaller_one_is_refused(tmp_path):
    out = tmp_path / "r"
    run(_opts(out, budget_seconds=1e-6), log=lambda m: None)  # cut after its first step
    cut = _records(out)
    assert len(cut) == 1 and cut[0]["budget_stop"] and cut[0]["step"] == 1
    assert cut[0]["budget_seconds"] == 1e-6
    assert all(r["budget_seconds"] == 1e-6 and r["budget_stop"] for r in _rows(out)
               if r["model"] == "dino-small")

    # The same budget: the rows as they were.
    lines = []
    run(_opts(out, resume=True, budget_seconds=1e-6), log=lines.append)
    assert any("finished earlier, rows reused" in line for line in lines)

    # No budget: training goes on from the cut to the planned 2 epochs (1,347
    # pre-training images at batch 128: 10 full steps an epoch), and the rows say so.
    lines = []
    run(_opts(out, resume=True), log=lines.append)
    assert any("continuing from its checkpoint under no time budget" in line
               for line in lines)
    records = _records(out)
    assert records[0] == cut[0]  # the cut's record kept, then the rest of the epochs
    assert [r["step"] for r in records] == [1, 10, 20]
    dino = [r for r in _rows(out) if r["model"] == "dino-small"]
    assert dino and not any("budget_seconds" in r for r in dino)

    # A budget under the training the state has had would claim what it did not do.
    before = (out / "results.json").read_bytes()
    with pytest.raises(CheckpointError, match="more than --budget-seconds 1e-06"):
        run(_opts(out, resume=True, budget_seconds=1e-6), log=lambda m: None)
    assert (out / "results.json").read_bytes() == before


def test_another_budget_without_the_checkpoint_is_refused(tmp_path):
    out = tmp_path / "r"
    run(_opts(out, budget_seconds=1e-6), log=lambda m: None)
    (out / "checkpoints" / "digits_seed0.pt").unlink()
    with pytest.raises(CheckpointError, match="no time budget.*is gone.*--restart"):
        run(_opts(out, resume=True), log=lambda m: None)
