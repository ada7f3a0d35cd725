"""Pure tensor maths behind the optimizers. No state, no torch.optim: each
function maps tensors of shape (..., rows, cols) to tensors, batched over the
leading dimensions."""

from slimopt.transforms.adam import adam_update_
from slimopt.transforms.hardware import fast_fp64, low_precision
from slimopt.transforms.numerics import rank_tolerance
from slimopt.transforms.orthogonalize import (
    METHODS,
    ORTHOGONALIZERS,
    SlowFloat64Warning,
    exact_method,
    orthogonality_error,
    orthogonalize,
    polar_fallbacks,
)
from slimopt.transforms.polar import POLAR_TOLERANCE
from slimopt.transforms.scaling import limit_norm_growth, scale_to_unit_rms
from slimopt.transforms.subspace import (
    SUBSPACE_METHODS,
    project,
    project_back_with_residual,
    refresh_subspace,
    rotate_moment,
    top_left_singular_vectors,
)
from slimopt.transforms.whiten import (
    WHITENING_METHODS,
    inverse_sqrt_newton_schulz,
    standardize_rows,
    whiten,
)

__all__ = [
    "METHODS",
    "ORTHOGONALIZERS",
    "POLAR_TOLERANCE",
    "SUBSPACE_METHODS",
    "WHITENING_METHODS",
    "SlowFloat64Warning",
    "adam_update_",
    "exact_method",
    "fast_fp64",
    "inverse_sqrt_newton_schulz",
    "limit_norm_growth",
    "low_precision",
    "orthogonality_error",
    "orthogonalize",
    "polar_fallbacks",
    "project",
    "project_back_with_residual",
    "rank_tolerance",
    "refresh_subspace",
    "rotate_moment",
    "scale_to_unit_rms",
    "standardize_rows",
    "top_left_singular_vectors",
    "whiten",
]
