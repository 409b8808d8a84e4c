"""What a run records about how it was made: the package's commit (``+dirty`` when the
package's files differ from it), read in a throwaway git repository, and the command line
as it was typed."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from dinobench import provenance
from dinobench.cli import main
from helpers import TINY


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "commit.gpgsign=false", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def package_in_repo(tmp_path, monkeypatch):
    """A git repository holding a stand-in package folder, which ``git_commit`` reads as
    its own (it looks beside its module file); git cannot see past ``tmp_path``."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    repo, pkg = tmp_path / "repo", tmp_path / "repo" / "pkg"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(provenance, "__file__", str(pkg / "provenance.py"))
    return repo, pkg


def test_git_commit_is_the_short_head_and_dirty_when_the_package_differs(package_in_repo):
    repo, pkg = package_in_repo
    assert provenance.git_commit() is None  # not a repository yet
    (pkg / "provenance.py").write_text("x = 1\n")
    (repo / "README.md").write_text("notes\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    first = _git(repo, "rev-parse", "--short", "HEAD")
    assert provenance.git_commit() == first

    (pkg / "provenance.py").write_text("x = 2\n")  # an edit to the package
    assert provenance.git_commit() == first + "+dirty"

    _git(repo, "commit", "-q", "-am", "second")
    second = _git(repo, "rev-parse", "--short", "HEAD")
    assert second != first and provenance.git_commit() == second

    # Only the package's own files count: an edit elsewhere in the checkout does not.
    (repo / "README.md").write_text("more notes\n")
    assert provenance.git_commit() == second


def test_a_run_records_its_command_as_typed(tmp_path, capsys):
    """meta.command is the argv given to main, quoted so that it can be typed again (a
    folder with a space in it), and it opens results.md."""
    out = tmp_path / "my run"
    argv = ["run", *TINY, "--epochs", "1", "--no-probe", "--eval-every", "0", "--out",
            str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["command"] == (f"dinobench run {' '.join(TINY)} --epochs 1 --no-probe "
                               f"--eval-every 0 --out '{out}'")
    assert shlex.split(meta["command"]) == ["dinobench", *argv]
    assert (out / "results.md").read_text().startswith(f"Made by `{meta['command']}` · ")
