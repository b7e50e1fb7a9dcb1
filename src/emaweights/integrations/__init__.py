"""Adapters for the training frameworks people actually use.

Each adapter is a module of its own and is imported only when asked for, so
``import emaweights`` never loads a framework:

* :mod:`emaweights.integrations.lightning`: a Lightning ``Callback``
  (``pip install 'emaweights[lightning]'``).
* :mod:`emaweights.integrations.transformers`: a ``TrainerCallback`` for the
  Hugging Face ``Trainer`` (``pip install 'emaweights[transformers]'``).
* :mod:`emaweights.integrations.accelerate`: helpers for an Accelerate loop
  (``pip install 'emaweights[accelerate]'``).
* :mod:`emaweights.integrations.peft`: export averaged LoRA/PEFT adapters in
  the adapter's own format (``pip install 'emaweights[peft]'``).
* :mod:`emaweights.integrations.deepspeed`: full-tensor state dicts for an
  EMA on DeepSpeed ZeRO-3 partitions (``pip install 'emaweights[deepspeed]'``).

All of them share the same guarantees: the average is updated once per
optimizer step (never per micro-batch under gradient accumulation), evaluation
runs with the averaged weights swapped in and the live weights put back
afterwards, checkpoints always hold the live weights as the model weights and
the EMA state beside them, and a resumed run continues the average exactly.
"""
