"""The ``emaweights`` command's own options: ``--version`` and the help listing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import emaweights
from emaweights.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_package_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`emaweights --version` prints exactly `emaweights <emaweights.__version__>`."""
    assert main([flag]) == 0
    assert capsys.readouterr().out == f"emaweights {emaweights.__version__}\n"


def test_version_from_console_entry_point() -> None:
    """`python -m emaweights --version` (a fresh process) agrees with `__version__`."""
    out = subprocess.run(
        [sys.executable, "-m", "emaweights", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert out.strip() == f"emaweights {emaweights.__version__}"


def test_distribution_version_is_package_version() -> None:
    """pyproject.toml takes the version from `emaweights.__version__`, so the two cannot drift."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "emaweights.__version__"}


def _listing(capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("commands:") + 1
    return lines[start : start + len(COMMANDS)]


def test_help_lists_every_command_in_one_column(capsys: pytest.CaptureFixture[str]) -> None:
    """Each command's help text starts in the same column, at least two spaces after its name."""
    rows = _listing(capsys)
    assert [row.split()[0] for row in rows] == list(COMMANDS)
    columns = {row.index(help_) for row, (_, help_) in zip(rows, COMMANDS.values(), strict=True)}
    assert len(columns) == 1
    (column,) = columns
    assert column >= 2 + max(map(len, COMMANDS)) + 2


def test_help_fits_80_columns(capsys: pytest.CaptureFixture[str]) -> None:
    """No line of `emaweights --help` is wider than a terminal's 80 columns."""
    assert main(["--help"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 80


def test_unknown_command_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command exits 2 and the error names the value passed."""
    assert main(["nonsense-cmd"]) == 2
    assert "'nonsense-cmd'" in capsys.readouterr().err
