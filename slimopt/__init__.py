"""slimopt: memory-lean optimizers for training language models.

    from slimopt import SUMO, param_groups
    optimizer = SUMO(param_groups(model, rank=128), lr=1e-3)
"""

from slimopt.optim import APOLLO, SUMO, SWAN, AdamW, APOLLOMini, GaLore, SlimOptimizer, param_groups

__version__ = "0.1.0"

__all__ = ["APOLLO", "SUMO", "SWAN", "APOLLOMini", "AdamW", "GaLore", "SlimOptimizer", "__version__", "param_groups"]
