"""Import an optional framework, or fail with the extra that provides it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an ImportError naming ``extra``.

    Raises:
        ImportError: ``module`` is not installed; the message says which
            ``emaweights`` extra installs it.

    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this emaweights adapter needs the {module!r} package, which is not installed; "
            f"install it with `pip install 'emaweights[{extra}]'`"
        ) from err
