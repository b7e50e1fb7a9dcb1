"""Package-level claims: the core imports no optional framework."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = [
    "lightning",
    "pytorch_lightning",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "sklearn",
    "matplotlib",
    "rich",
    "tqdm",
    "numpy.testing",
]


def test_import_loads_no_optional_framework() -> None:
    """`import emaweights` imports none of the optional frameworks."""
    code = (
        "import sys, torch; before = set(sys.modules); import emaweights; "
        "new = set(sys.modules) - before; "
        f"print(sorted(m for m in new if m.split('.')[0] in {OPTIONAL!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_cli_help_lists_commands() -> None:
    """`python -m emaweights --help` prints the command list and exits 0."""
    out = subprocess.run(
        [sys.executable, "-m", "emaweights", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout
