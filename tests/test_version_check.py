"""The minimum torch version is stated once (pyproject.toml) and checked at import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dinobench._version_check import MIN_TORCH, check_torch, parse_version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_parse_version():
    assert parse_version("2.14.1+cu130") == (2, 14)
    assert parse_version("2.3.0a0") == (2, 3)
    with pytest.raises(ValueError, match=r"^cannot read a version from 'nightly'$"):
        parse_version("nightly")


def test_old_torch_is_refused_with_the_fix():
    with pytest.raises(ImportError, match=r"needs torch >= 2\.3, found 2\.2\.1.*pip install"):
        check_torch("2.2.1")
    check_torch("2.3.0")
    check_torch("10.0.0")


def test_pyproject_states_the_same_minimum():
    text = PYPROJECT.read_text()
    m = re.search(r'"torch>=(\d+)\.(\d+)"', text)
    assert m, "pyproject.toml must pin a minimum torch"
    assert (int(m.group(1)), int(m.group(2))) == MIN_TORCH
