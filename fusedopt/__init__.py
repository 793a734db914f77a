"""fusedopt: the flax.optim API on flat buffers with fused optimizer kernels.

``import fusedopt as optim`` is a drop-in for ``from flax import optim`` (flax 0.5.3).
"""
from . import frozen_dict, serialization, sharding, traverse_util
from .adabelief import AdaBelief
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam
from .adan import Adan
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .base import HyperParamError, Optimizer, OptimizerDef, OptimizerState
from .dynamic_scale import DynamicScale, DynamicScaleResult
from .flat import FlatOptimizerDef, FlatState, available_backends
from .flat_state import ParamState
from .lamb import LAMB
from .lars import LARS
from .layout import FlatLayout, LayoutError
from .lion import Lion
from .momentum import Momentum
from .multi import MultiOptimizer
from .rmsprop import RMSProp
from .sharding import FlatParams, shard_optimizer
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeOptimizerState
from .sgd import GradientDescent
from .traverse_util import ModelParamTraversal
from .weight_norm import WeightNorm

__version__ = "0.1.0"

__all__ = [
    "AdaBelief", "Adadelta", "Adafactor", "Adagrad", "Adam", "Adan", "AdEMAMix", "ADOPT", "DynamicScale",
    "DynamicScaleResult", "FlatLayout", "FlatOptimizerDef", "FlatState", "GradientDescent",
    "HyperParamError", "LAMB", "LARS", "LayoutError", "Lion", "ModelParamTraversal", "Momentum",
    "MultiOptimizer", "Optimizer", "OptimizerDef", "OptimizerState", "ParamState", "RMSProp",
    "ScheduleFreeAdamW", "ScheduleFreeOptimizerState", "WeightNorm",
    "FlatParams", "available_backends", "frozen_dict", "serialization", "shard_optimizer",
    "sharding", "traverse_util",
]

# flax 0.5.3 registered its Optimizer with flax.serialization; do the same when flax is there.
serialization.register_with_flax()
