"""Version floors: pyproject.toml, README and CI's floor environment say the same thing."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_env_pins_every_floor_ci_claims() -> None:
    """.ci/floors.py pins torch, lightning, transformers, accelerate to pyproject's `>=` floors."""
    table = _floors_module().floors(ROOT / "pyproject.toml")
    torch_spec = PYPROJECT["project"]["dependencies"][0]
    assert torch_spec == f"torch>={table['torch']}"
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("lightning", "transformers", "accelerate"):
        assert f"{extra}>={table[extra]}" in extras[extra]


def test_floor_script_installs_the_pinned_packages() -> None:
    """.ci/floor pins packages .ci/floors.py knows; .ci/run runs make test, then .ci/floor."""
    script = (ROOT / ".ci" / "floor").read_text()
    packages = re.search(r"PACKAGES=\(([^)]*)\)", script)
    assert packages is not None
    table = _floors_module().floors(ROOT / "pyproject.toml")
    assert set(packages[1].split()) <= set(table)
    assert {"torch", "lightning", "transformers", "accelerate"} <= set(packages[1].split())
    run = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line[:1] not in "#"]
    assert run[-2:] == ["make test", "bash .ci/floor"]


def test_one_safetensors_floor() -> None:
    """Every extra that names safetensors claims the same floor (one floor per package)."""
    specs = [
        spec
        for extra in PYPROJECT["project"]["optional-dependencies"].values()
        for spec in extra
        if spec.startswith("safetensors")
    ]
    assert len(set(specs)) == 1


def test_readme_states_the_torch_floor() -> None:
    """The README's sentence on what the library depends on quotes pyproject's torch floor."""
    torch_spec = PYPROJECT["project"]["dependencies"][0]
    assert f"depends on `{torch_spec}`" in (ROOT / "README.md").read_text()


def test_make_test_skips_slow_as_readme_says() -> None:
    """The pytest default excludes `slow`, and README says so and how to run them."""
    assert "-m 'not slow'" in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    readme = (ROOT / "README.md").read_text()
    assert "the whole test suite" not in readme
    assert "PYTEST_ARGS='-m slow'" in readme
    assert "$(PYTEST_ARGS)" in (ROOT / "Makefile").read_text()
