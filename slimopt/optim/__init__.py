"""torch.optim optimizers built from slimopt.transforms."""

from slimopt.optim.adamw import AdamW, AdamWAlgorithm
from slimopt.optim.algorithm import Algorithm
from slimopt.optim.apollo import APOLLO, ApolloAlgorithm, APOLLOMini
from slimopt.optim.galore import GaLore, GaLoreAlgorithm
from slimopt.optim.groups import DEFAULT_HEAD_NAMES, param_groups
from slimopt.optim.lowmem import AdamW8bitAlgorithm, FactoredAdamWAlgorithm
from slimopt.optim.optimizer import FallbackWarning, RoutingWarning, SlimOptimizer
from slimopt.optim.sumo import SUMO, SumoAlgorithm
from slimopt.optim.swan import SWAN, SwanAlgorithm

# The algorithms any group of a slimopt optimizer may name. RSO's optimizer extends its own copy.
ALGORITHMS = {a.name: a for a in (AdamWAlgorithm(), AdamW8bitAlgorithm(), FactoredAdamWAlgorithm(), GaLoreAlgorithm(),
                                   SumoAlgorithm(), SwanAlgorithm(), ApolloAlgorithm())}
SlimOptimizer.algorithms = ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "APOLLO",
    "DEFAULT_HEAD_NAMES",
    "SUMO",
    "SWAN",
    "APOLLOMini",
    "AdamW",
    "Algorithm",
    "FallbackWarning",
    "GaLore",
    "RoutingWarning",
    "SlimOptimizer",
    "param_groups",
]
