"""emaweights: averaged copies of model weights for PyTorch training and fine-tuning.

The core imports only torch. Framework adapters live in
``emaweights.integrations`` and are imported only when asked for.
"""

from emaweights.averager import Averager, AveragerProtocol
from emaweights.bema import BEMA
from emaweights.ema import EMA, NonFiniteError, SwapError
from emaweights.export import load_averaged, save_averaged
from emaweights.flat import flatten_parameters
from emaweights.interpolate import interpolate
from emaweights.lawa import LAWA
from emaweights.multi import MultiEMA
from emaweights.post_hoc import PostHocEMA, reconstruct
from emaweights.pullback import PullBack
from emaweights.schedules import (
    Constant,
    HalfLife,
    PowerFunction,
    PowerWarmup,
    Schedule,
    Warmup,
)
from emaweights.swa import SWA, update_bn
from emaweights.switch import SwitchEMA

__all__ = [
    "BEMA",
    "EMA",
    "LAWA",
    "SWA",
    "Averager",
    "AveragerProtocol",
    "Constant",
    "HalfLife",
    "MultiEMA",
    "NonFiniteError",
    "PostHocEMA",
    "PowerFunction",
    "PowerWarmup",
    "PullBack",
    "Schedule",
    "SwapError",
    "SwitchEMA",
    "Warmup",
    "flatten_parameters",
    "interpolate",
    "load_averaged",
    "reconstruct",
    "save_averaged",
    "update_bn",
]

__version__ = "0.1.0"
