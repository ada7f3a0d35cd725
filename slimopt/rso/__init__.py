"""RSO, randomized subspace optimization: each hidden linear layer trains as W_k + B Pᵀ with a random,
frozen P (n_in × r) and a small trainable B, which cuts optimizer state, gradients and the activations
saved for backward.

    import slimopt.rso
    optimizer = slimopt.rso.RSO(model, lr=1e-3, rank=128)   # swaps the layers, is a torch.optim.Optimizer
    ...
    slimopt.rso.merge(model)                                # plain nn.Linear layers again
"""

from slimopt.rso.layer import DISTRIBUTIONS, Projection, RSOLinear, draw_projection
from slimopt.rso.optimizer import RSO, RSOAlgorithm, state_numel
from slimopt.rso.surgery import SHARED_INPUTS, Adaptation, apply, merge

__all__ = [
    "DISTRIBUTIONS",
    "RSO",
    "SHARED_INPUTS",
    "Adaptation",
    "Projection",
    "RSOAlgorithm",
    "RSOLinear",
    "apply",
    "draw_projection",
    "merge",
    "state_numel",
]
