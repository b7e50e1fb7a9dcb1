"""Print a pip constraints file pinning each claimed dependency to its floor.

Run by ``.ci/floor``: ``torch>=2.6`` in pyproject.toml becomes ``torch==2.6``, so
the floor environment installs exactly the oldest releases we claim to support.
Packages named on the command line restrict the output (default: all floors).
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

_FLOOR = re.compile(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)$")


def floors(pyproject: Path) -> dict[str, str]:
    """Map each dependency (core and extras) declared as ``name>=X`` to ``X``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    found: dict[str, str] = {}
    for spec in specs:
        match = _FLOOR.match(spec.strip())
        if match:
            found[match[1].lower()] = match[2]
    return found


def main(argv: list[str]) -> int:
    """Write ``name==floor`` lines to stdout for the packages in ``argv``."""
    table = floors(Path(__file__).resolve().parent.parent / "pyproject.toml")
    wanted = [name.lower() for name in argv] or sorted(table)
    missing = [name for name in wanted if name not in table]
    if missing:
        print(f"floors.py: no 'name>=X' floor in pyproject.toml for {missing}", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"{name}=={table[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
