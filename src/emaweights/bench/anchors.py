"""Loaders for the other EMA libraries ("anchors") that the speed benchmark times.

``pip install 'emaweights[bench-anchors]'`` installs ema-pytorch, torch_ema and
diffusers, none of which constrains the torch build. timm is installed apart,
with ``pip install --no-deps timm``: its ``ModelEmaV3`` lives in
``timm/utils/model_ema.py``, which imports only torch, but the timm package
imports torchvision, and PyPI's torchvision wheels pin one torch release built
with CUDA (installing it next to the CPU build of torch either replaces torch
or leaves a torchvision that fails at import). :func:`timm_model_ema` therefore
loads that one file without importing the timm package.

Every loader raises :class:`ImportError` with the command that installs the
library, also when the library is installed but fails to import (for example
diffusers next to a torchvision built for another torch).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["HINT", "TIMM_HINT", "import_anchor", "timm_model_ema"]

HINT = "pip install 'emaweights[bench-anchors]'"
TIMM_HINT = "pip install --no-deps timm"
_TIMM_FILE = "emaweights_anchor_timm_model_ema"  # our name for timm/utils/model_ema.py


def import_anchor(name: str) -> ModuleType:
    """Import module ``name`` of an anchor library.

    Raises:
        ImportError: the module is not installed or fails to import; the
            message names the error and the install command.

    """
    try:
        return importlib.import_module(name)
    except Exception as err:  # a broken dependency raises anything (RuntimeError, OSError)
        raise ImportError(f"{name} not importable: {type(err).__name__}: {err} ({HINT})") from err


def timm_model_ema() -> ModuleType:
    """Load timm's ``timm/utils/model_ema.py`` (``ModelEmaV3`` and friends) alone.

    Uses ``timm.utils.model_ema`` when timm is already imported; otherwise
    executes the installed file under a private module name, so torchvision is
    never imported.

    Raises:
        ImportError: timm is not installed, or has no ``utils/model_ema.py``.

    """
    loaded = sys.modules.get("timm.utils.model_ema") or sys.modules.get(_TIMM_FILE)
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("timm")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"timm is not installed ({TIMM_HINT})")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    file_spec = importlib.util.spec_from_file_location(_TIMM_FILE, path)
    if not path.is_file() or file_spec is None or file_spec.loader is None:
        raise ImportError(f"timm at {path.parent.parent} has no utils/model_ema.py ({TIMM_HINT})")
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as err:
        raise ImportError(f"{path} failed to load: {type(err).__name__}: {err}") from err
    sys.modules[_TIMM_FILE] = module
    return module
