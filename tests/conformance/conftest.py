"""Each conformance test writes averagers' files (post-hoc snapshots) under its own tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.registry import use_scratch


@pytest.fixture(autouse=True)
def _scratch(tmp_path: Path) -> None:
    """Averagers made by a test keep their files in its tmp_path, numbered from 0."""
    use_scratch(tmp_path)
