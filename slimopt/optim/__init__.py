"""torch.optim optimizers built from slimopt.transforms."""

from slimopt.optim.adamw import AdamWAlgorithm
from slimopt.optim.algorithm import REGISTRY, Algorithm
from slimopt.optim.galore import GaLore
from slimopt.optim.groups import DEFAULT_HEAD_NAMES, param_groups
from slimopt.optim.optimizer import SlimOptimizer
from slimopt.optim.sumo import SUMO
from slimopt.optim.swan import SWAN

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "REGISTRY",
    "SUMO",
    "SWAN",
    "AdamWAlgorithm",
    "Algorithm",
    "GaLore",
    "SlimOptimizer",
    "param_groups",
]
