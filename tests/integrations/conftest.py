"""Keep the frameworks offline, quiet and single-threaded-friendly in these tests."""

from __future__ import annotations

import os

# Set before any framework is imported (collection imports the test modules).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "TRANSFORMERS_VERBOSITY": "error",
    "PL_DISABLE_FORK": "1",
}.items():
    os.environ.setdefault(_key, _value)
