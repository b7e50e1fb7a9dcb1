"""Adapters are lazily imported, and a missing framework names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


# A meta-path finder that pretends the framework is not installed.
_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('No module named ' + repr(name))
sys.meta_path.insert(0, Block())
try:
    import emaweights.integrations.{adapter}
except ImportError as err:
    print('ERR', err)
else:
    print('imported')
"""


@pytest.mark.parametrize(
    ("adapter", "blocked", "extra"),
    [
        ("lightning", ["lightning", "pytorch_lightning"], "lightning"),
        ("transformers", ["transformers"], "transformers"),
        ("accelerate", ["accelerate"], "accelerate"),
        ("peft", ["peft"], "peft"),
    ],
)
def test_missing_framework_names_the_extra(adapter: str, blocked: list[str], extra: str) -> None:
    """Importing an adapter without its framework raises ImportError naming the extra."""
    out = _run(_BLOCK.format(adapter=adapter, blocked=blocked))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR"), out.stdout
    assert f"emaweights[{extra}]" in out.stdout, out.stdout
