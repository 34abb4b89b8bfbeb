"""``aqcf --version``."""

from __future__ import annotations

import pytest

from aqcf.cli import main
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_version_prints_the_installed_version(capsys):
    assert main(["--version"]) == 0
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"aqcf {declared}\n"
