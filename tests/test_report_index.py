"""The results index: findings first, run folders with how each was made, sweeps by link."""

import json
import re

import pytest

from dinobench.errors import UserError
from dinobench.report import index_markdown, provenance_note, write_index, write_results
from helpers import dinobench, one_line_error


def rows(dataset: str, model: str, value: float) -> list[dict]:
    return [{"dataset": dataset, "model": model, "metric": "knn_top1", "value": value,
             "seed": 0}]


META = {"command": "dinobench run --datasets digits", "git_commit": "abc1234",
        "machine": "x86_64, 2 cores", "threads": 1, "seeds": [0, 1, 2], "seconds": 90.0}


def test_provenance_note_names_command_commit_machine_seeds_and_wall_time():
    note = provenance_note(META)
    assert note == ("Made by `dinobench run --datasets digits` · commit abc1234 · "
                    "x86_64, 2 cores, 1 threads · seeds 0 1 2 · 1.5 min wall.\n\n")
    assert provenance_note({"seeds": [0]}) == ""  # no command: nothing to say
    assert ("x86_64, 2 cores, 1 threads, bf16 autocast · seeds"
            in provenance_note({**META, "precision": "bf16"}))
    assert provenance_note({**META, "precision": "fp32"}) == note
    assert provenance_note(None) == ""


def test_index_opens_with_findings_lists_runs_and_links_sweeps(tmp_path):
    write_results(tmp_path / "reference" / "digits-cpu", rows("digits", "dino-small", 90.0),
                  META, {})
    sweep = tmp_path / "studies" / "lr"
    unit = sweep / "variants" / "base" / "seed0"
    write_results(unit, rows("digits", "dino-small", 50.0), {"command": "unit"}, {})
    (unit / "sweep_unit.json").write_text("{}")
    (sweep / "sweep.json").write_text(json.dumps({"kind": "dinobench-sweep",
                                                  "command": "dinobench sweep --lr 1e-3"}))
    (tmp_path / "findings.md").write_text("# What DINO learns here\n\nIt learns.\n")

    md = write_index(tmp_path)
    assert md.startswith("# What DINO learns here\n\nIt learns.\n\n# Results\n")
    assert "| reference/digits-cpu | digits | dino-small | 90.00 |" in md
    assert "variants/base/seed0" not in md  # a sweep's units stay in its own table
    assert ("- [reference/digits-cpu](reference/digits-cpu/results.md): "
            "`dinobench run --datasets digits` · commit abc1234") in md
    assert "- [studies/lr](studies/lr/sweep.md): `dinobench sweep --lr 1e-3`" in md
    assert (tmp_path / "README.md").read_text() == md
    assert index_markdown(tmp_path) == md  # what write_index wrote, rebuilt the same


def test_index_of_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=rf"^no run folder with a results\.json under "
                                        rf"{re.escape(str(tmp_path))}; run 'dinobench run' "
                                        rf"first$"):
        write_index(tmp_path)
    assert not list(tmp_path.iterdir())


def test_report_index_of_an_empty_folder_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = dinobench("report", "--index", str(empty))
    assert done.returncode == 2
    assert one_line_error(done.stderr) == (f"dinobench report: error: no run folder with a "
                                           f"results.json under {empty}; run 'dinobench "
                                           "run' first")
    assert done.stdout == ""
    assert not (empty / "README.md").exists()
    assert not list(empty.iterdir())  # nor a temporary file


def test_a_run_records_the_commit_it_started_from(monkeypatch, tmp_path):
    """A long run can end after the checkout has moved on; its results name the commit
    read when it started, not the one at its end."""
    import importlib

    from dinobench.run import RunOptions, run
    run_module = importlib.import_module("dinobench.run")  # the module, not the function

    # The checkout "moves" once the run has begun: at its first line of progress.
    moved = []
    monkeypatch.setattr(run_module, "git_commit",
                        lambda: "checked-out-later" if moved else "started-here")
    opts = RunOptions(datasets=["digits"], seeds=[0], out=tmp_path / "r", progress=False,
                      probe=False, eval_every=0, attention_images=2,
                      overrides=dict(depth=1, dim=32, heads=2, mlp_dim=64, batch_size=128,
                                     n_local=2, epochs=1))
    run(opts, log=lambda s: moved.append(s))
    assert moved
    meta = json.loads((tmp_path / "r" / "results.json").read_text())["meta"]
    assert meta["git_commit"] == "started-here"
