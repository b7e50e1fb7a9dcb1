"""Adapters are lazily imported, and a missing framework names the extra to install."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ["lightning", "pytorch_lightning", "transformers", "accelerate", "peft"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_core_and_integrations_package_import_no_framework() -> None:
    """`import emaweights, emaweights.integrations, emaweights.export` loads no framework."""
    code = (
        "import sys; import emaweights, emaweights.integrations, emaweights.export; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# A meta-path finder that pretends no framework is installed, then each adapter is tried.
_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('No module named ' + repr(name))
sys.meta_path.insert(0, Block())
for adapter in {adapters!r}:
    try:
        __import__('emaweights.integrations.' + adapter)
    except ImportError as err:
        print(adapter, 'ERR', err)
    else:
        print(adapter, 'imported')
"""

EXTRAS = {"lightning": "lightning", "transformers": "transformers", "accelerate": "accelerate"}
EXTRAS["peft"] = "peft"


def test_missing_framework_names_the_extra() -> None:
    """Importing an adapter without its framework raises ImportError naming the extra."""
    out = _run(_BLOCK.format(blocked=FRAMEWORKS, adapters=list(EXTRAS)))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines.keys() == EXTRAS.keys(), out.stdout
    for adapter, extra in EXTRAS.items():
        assert lines[adapter].startswith("ERR"), (adapter, lines[adapter])
        assert f"emaweights[{extra}]" in lines[adapter], (adapter, lines[adapter])
