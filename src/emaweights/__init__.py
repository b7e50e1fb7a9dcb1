"""emaweights: averaged copies of model weights for PyTorch training and fine-tuning.

The core imports only torch. Framework adapters live in
``emaweights.integrations`` and are imported only when asked for.
"""

from emaweights.ema import EMA, SwapError
from emaweights.flat import flatten_parameters
from emaweights.interpolate import interpolate
from emaweights.schedules import Constant, HalfLife, PowerWarmup, Schedule, Warmup

__all__ = [
    "EMA",
    "Constant",
    "HalfLife",
    "PowerWarmup",
    "Schedule",
    "SwapError",
    "Warmup",
    "flatten_parameters",
    "interpolate",
]

__version__ = "0.1.0"
