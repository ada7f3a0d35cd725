"""The RSO linear layer: W = W_k + B Pᵀ with W_k and P frozen, B trainable.

    y = x W_kᵀ + (x P) Bᵀ + bias

Backward keeps x·P (tokens × r) instead of x (tokens × n_in):

    ∂L/∂B = (∂L/∂y)ᵀ (x P)
    ∂L/∂x = (∂L/∂y) W_k + ((∂L/∂y) B) Pᵀ
    no gradient for W_k or P.

The product is split in two autograd functions, x ↦ x·P and (x, x·P) ↦ y, so that layers reading the
same input (q/k/v, gate/up) can share one P: one x·P is computed and saved for all of them, and autograd
sums their (∂L/∂y) B before the single Pᵀ product.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from slimopt.distributed.placement import local
from slimopt.transforms.subspace import sketch_seed

DISTRIBUTIONS = ("gaussian", "orthogonal")


def draw_projection(in_features: int, rank: int, distribution: str, seed: int, subproblem: int,
                    *, device, dtype) -> torch.Tensor:
    """P (in_features × rank) of one subproblem, with E[P Pᵀ] = I.

    "gaussian": entries N(0, 1/r). "orthogonal": Haar-distributed orthonormal columns (QR of a Gaussian,
    signs fixed by diag(R)), scaled by √(n_in/r). The Gaussian is drawn in fp32 on the CPU, so a seed gives
    the same subspace on every device; the QR runs on ``device`` in fp32 (fp64 for an fp64 ``dtype``).
    For a CUDA ``device`` it is drawn into pinned memory and copied without blocking the host (a pageable
    copy would sync at every resample); the cast to ``dtype`` then runs on the device, which is exact.
    On the meta device nothing is drawn: an empty meta P of the shape and ``dtype``.
    """
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(in_features, rank, device="meta", dtype=dtype)
    generator = torch.Generator().manual_seed(sketch_seed(seed, subproblem))
    cuda = device is not None and torch.device(device).type == "cuda"
    gaussian = torch.randn(in_features, rank, generator=generator, pin_memory=cuda)
    gaussian = gaussian.to(device, non_blocking=cuda).to(torch.promote_types(dtype, torch.float32))
    if distribution == "gaussian":
        P = gaussian / math.sqrt(rank)
    else:
        Q, R = torch.linalg.qr(gaussian)
        signs = torch.where(torch.diagonal(R) < 0, -1.0, 1.0)
        P = Q * signs * math.sqrt(in_features / rank)
    return P.to(dtype)


class _Project(torch.autograd.Function):
    """x ↦ x·P, keeping P (a buffer the model holds anyway) rather than x for backward."""

    @staticmethod
    def forward(ctx, x, P):
        ctx.save_for_backward(P)
        return x @ P

    @staticmethod
    def backward(ctx, grad_xP):
        (P,) = ctx.saved_tensors
        return grad_xP @ P.mT.to(grad_xP.dtype), None


class _SubspaceLinear(torch.autograd.Function):
    """(x, x·P) ↦ x W_kᵀ + (x P) Bᵀ + bias. Saves x·P, W_k and B; never x."""

    @staticmethod
    def forward(ctx, x, xP, weight, B, bias):
        ctx.save_for_backward(xP, weight, B)
        ctx.has_bias = bias is not None
        y = F.linear(x, weight, bias)
        # In place, so the low-rank term costs no output-sized temporary. The casts are no-ops unless
        # autocast made y (and x·P) lower precision than B; backward casts the same way.
        y.view(-1, y.shape[-1]).addmm_(xP.reshape(-1, xP.shape[-1]).to(y.dtype), B.mT.to(y.dtype))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        xP, weight, B = ctx.saved_tensors
        grad_x = grad_xP = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_xP = grad_y @ B.to(grad_y.dtype)
        if ctx.needs_input_grad[3]:
            grad_B = grad_y.reshape(-1, grad_y.shape[-1]).mT @ xP.reshape(-1, xP.shape[-1]).to(grad_y.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_xP, None, grad_B, grad_bias


class Projection(nn.Module):
    """The random P of the current subproblem, for one layer or for several that read the same input.

    The model's state dict keeps the seed and the subproblem index (int64 buffers), never P: loading
    them redraws P, so a checkpoint resumes with the same subspace.
    """

    def __init__(self, in_features: int, rank: int, distribution: str, seed: int, *, device, dtype):
        super().__init__()
        self.in_features = in_features
        self.rank = rank
        self.distribution = distribution
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64, device=device))
        self.register_buffer("subproblem", torch.tensor(0, dtype=torch.int64, device=device))
        self.register_buffer("P", torch.empty(in_features, rank, device=device, dtype=dtype), persistent=False)
        # (seed, subproblem) as host ints: reading the int64 buffers on a GPU would sync at every resample.
        self._key = (seed, 0)
        self._drawn_for = None
        self._redraw()
        self.register_load_state_dict_post_hook(_redraw_after_load)
        # (x, its x·P, x's version) of the last call, held weakly: a hit needs x alive and unchanged and
        # x·P still saved by a layer's backward, so the cache never extends any tensor's life.
        self._last_call = None

    def __getstate__(self):
        # The cache belongs to one forward pass of this module: copies and pickles start without it.
        return {**super().__getstate__(), "_last_call": None}

    @torch.no_grad()
    def _redraw(self) -> None:
        if self.P.device.type == "meta":  # shapes only (slimopt memory, plan): nothing drawn, nothing to keep
            self._drawn_for = None
            return
        if self._key == self._drawn_for:  # loading the subproblem already drawn keeps P
            return
        self.P.copy_(draw_projection(self.in_features, self.rank, self.distribution, *self._key,
                                     device=self.P.device, dtype=self.P.dtype))
        self._drawn_for = self._key

    @torch.no_grad()
    def next_subproblem(self) -> None:
        """Draw P for the next subproblem. Merge the layers reading this projection first."""
        self.subproblem += 1
        self._key = (self._key[0], self._key[1] + 1)
        self._redraw()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·P, computed once for consecutive calls on the same x (q, k and v read one input)."""
        if self._last_call is not None:
            last_input, last_output, version = self._last_call
            xP = last_output()
            if last_input() is x and xP is not None and version == x._version:
                return xP
        xP = _Project.apply(x, self.P)
        self._last_call = (weakref.ref(x), weakref.ref(xP), x._version)
        return xP

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, distribution={self.distribution!r}"


def _redraw_after_load(projection: Projection, incompatible_keys) -> None:
    projection._key = (int(projection.seed), int(projection.subproblem))  # one read per load, not per resample
    projection._redraw()


class RSOLinear(nn.Module):
    """Stands in for an nn.Linear during RSO training.

    ``weight`` is the linear layer's own Parameter, frozen (W_k: no gradient, no optimizer state);
    ``B`` (out_features × rank) is the trainable coordinate in the subspace, zero at each subproblem's
    start; ``projection`` holds P and may be shared with sibling layers, of which exactly one owns it
    (``owns_projection=True``: it is that layer's submodule, saved and moved with it).
    """

    def __init__(self, linear: nn.Linear, projection: Projection, owns_projection: bool = True):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        self.B = nn.Parameter(torch.zeros(linear.out_features, projection.rank,
                                          device=linear.weight.device, dtype=linear.weight.dtype))
        if owns_projection:
            self.projection = projection
        else:
            # A projection shared with sibling layers (q/k/v) is a submodule of one of them only, so the model's
            # state dict holds its seed and subproblem once: safetensors (save_pretrained) refuses a tensor
            # saved under two names. The other siblings keep a plain reference.
            object.__setattr__(self, "projection", projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("RSO keeps W_k frozen and gives it no gradient, but this layer's weight has "
                               "requires_grad=True; call slimopt.rso.merge(model) to train it as a plain nn.Linear")
        return _SubspaceLinear.apply(x, self.projection(x), self.weight, self.B, self.bias)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W_k + B Pᵀ, accumulated in fp32 (fp64 for fp64 weights), in the weight's dtype.

        Under FSDP2, this rank's rows of it: W_k and B are sharded alike on dim 0 (both have out_features
        rows), and P is whole on every rank, so each rank merges its own rows with no communication."""
        weight, B = local(self.weight), local(self.B)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        merged = torch.addmm(weight.to(dtype), B.to(dtype), self.projection.P.to(dtype).mT)
        return merged.to(weight.dtype)

    @torch.no_grad()
    def merge_(self) -> None:
        """W_k ← W_k + B Pᵀ and B ← 0: the layer computes the same function with B back at zero."""
        local(self.weight).copy_(self.merged_weight())
        self.B.zero_()

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (the same Parameter, trainable again) and the bias."""
        self.merge_()
        self.weight.requires_grad_(True)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
