r"""PEFT / LoRA: average only the adapters, export them in PEFT's own format.

The EMA tracks trainable tensors only (``include_frozen=False``, the
default), so for a LoRA model the shadow costs the size of the adapters (and
any ``modules_to_save`` heads), not a copy of the frozen backbone:

.. math::
    \bar A_t = \beta\bar A_{t-1} + (1-\beta)A_t ,\qquad
    \bar B_t = \beta\bar B_{t-1} + (1-\beta)B_t .

Note that averaging :math:`A` and :math:`B` separately is not averaging the
update :math:`BA` (the product of averages differs from the average of
products); it is what adapter EMA means in practice, and what loads back
as an adapter.

Usage::

    ema = EMA(peft_model, 0.999)           # shadow = the adapters only
    ...
    save_averaged_adapter(ema, "out/adapter-ema")
    PeftModel.from_pretrained(base_model, "out/adapter-ema")
"""

from __future__ import annotations

import os
from typing import Any

from emaweights._naming import unwrap
from emaweights.ema import EMA
from emaweights.integrations._require import require

__all__ = ["save_averaged_adapter"]

_peft = require("peft", "peft")


def save_averaged_adapter(ema: EMA, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write the averaged adapters with ``PeftModel.save_pretrained`` (adapter format).

    The live model is untouched: the averaged weights are handed over as a
    state dict of owned copies.

    Args:
        ema: an EMA whose model is a ``peft.PeftModel`` (bare or wrapped).
        path: output folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        **kwargs: passed to ``save_pretrained`` (e.g. ``selected_adapters``).

    Raises:
        ImportError: peft is not installed (names the extra).
        TypeError: the EMA's model is not a PEFT model.

    """
    model = unwrap(ema.model)
    if not isinstance(model, _peft.PeftModel):
        raise TypeError(
            f"save_averaged_adapter needs an EMA of a peft.PeftModel, got {type(model).__name__}"
        )
    model.save_pretrained(str(path), state_dict=ema.averaged_state_dict(), **kwargs)
