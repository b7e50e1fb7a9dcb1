"""Export the averaged weights as a plain model checkpoint (safetensors).

The file holds an ordinary model state dict (canonical names, the model's
dtypes), so it loads into the bare model with ``model.load_state_dict`` and
needs no emaweights to read. Loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from emaweights.ema import EMA
from emaweights.io import PathLike, load_safetensors, save_safetensors

__all__ = ["load_averaged", "save_averaged"]


def save_averaged(ema: EMA, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ema.averaged_state_dict()`` to a safetensors file, atomically.

    Args:
        ema: the averager.
        path: target file (conventionally ``*.safetensors``).
        metadata: extra string metadata; the EMA step and update count are added.

    """
    meta = {"format": "pt", "emaweights.step": str(ema.step)}
    meta["emaweights.num_updates"] = str(ema.num_updates)
    meta.update(metadata or {})
    save_safetensors(ema.averaged_state_dict(), path, metadata=meta)


def load_averaged(
    path: PathLike, model: nn.Module | None = None, device: str = "cpu"
) -> dict[str, Tensor]:
    """Read averaged weights written by :func:`save_averaged`; optionally load them.

    Args:
        path: the safetensors file.
        model: if given, the weights are loaded into it with ``load_state_dict``
            (strict).
        device: where the tensors are read to.

    Returns:
        The state dict.

    Raises:
        emaweights.io.LoadError: the file is not valid safetensors.
        RuntimeError: ``model`` does not match the file (from ``load_state_dict``).

    """
    state = load_safetensors(path, device=device)
    if model is not None:
        model.load_state_dict(state)
    return state
