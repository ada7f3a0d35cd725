"""A causal-LM cross-entropy that never holds the batch × seq × vocab logits (``slimopt train --chunked-loss``).

HF's ``LlamaForCausalLM(labels=...)`` computes every logit (tokens × vocab), upcasts them to fp32 and saves
their log-softmax for backward: at a 32k vocabulary that is 128 KiB per token, more than a small model's
whole decoder saves. :func:`causal_lm_loss` takes the final hidden states and the head's weight instead,
and walks the tokens in chunks: forward keeps only each token's log-sum-exp (one fp32 per token), backward
recomputes one chunk's logits at a time to produce the gradients of the hidden states, the weight and the
bias. The price is one more head matmul in backward.

Semantics are HF's causal-LM loss: position t predicts label t + 1 (the last position predicts nothing),
labels equal to ``ignore_index`` (-100) count for nothing, the mean is over the tokens that count (or the
sum over ``num_items_in_batch``, as HF divides under gradient accumulation). The logits are computed in the
matmul dtype autocast would use (bf16 under ``--dtype bf16``; the weights' dtype without autocast) and
upcast to fp32, as HF does, before the log-softmax; gradients accumulate over the chunks in fp32.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: at a 32k vocabulary 128 MiB of fp32 logits at a time
IGNORE_INDEX = -100


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in here: autocast's dtype if it is on for this device, else the input's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """(h, W, b, targets) ↦ Σ over counted tokens of -log softmax(h Wᵀ + b)[target]; saves h, W, b, the targets
    and one log-sum-exp per token, never a tokens × vocab tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], chunk_size):
                logits = _logits(hidden[start:start + chunk_size], w, b, dtype)
                chunk_targets = targets[start:start + chunk_size]
                counted = chunk_targets != ignore_index
                picked = logits.gather(1, chunk_targets.clamp(min=0).unsqueeze(1)).squeeze(1)
                chunk_lse = _logsumexp_(logits)
                total += torch.where(counted, chunk_lse - picked, 0.0).sum()
                lse[start:start + chunk_size] = chunk_lse
                del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.ignore_index, ctx.dtype = chunk_size, ignore_index, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk_size, ignore_index, dtype = ctx.chunk_size, ctx.ignore_index, ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None  # fp32 sums over the chunks
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            rows = torch.arange(min(chunk_size, hidden.shape[0]), device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                chunk_targets = targets[start:start + chunk_size]
                counted = chunk_targets != ignore_index
                # d/dlogits of (lse - logit[target]) = softmax - onehot(target), per counted token; in place.
                grad = _logits(h, w, b, dtype)
                grad.sub_(lse[start:start + chunk_size].unsqueeze(1)).exp_()
                grad[rows[:h.shape[0]], chunk_targets.clamp(min=0)] -= 1.0
                grad.mul_((counted.to(torch.float32) * grad_total).unsqueeze(1))
                if need_b:
                    part = grad.sum(0)
                    grad_b = part if grad_b is None else grad_b.add_(part)
                    del part
                grad = grad.to(dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = grad @ w
                if need_w:
                    part = grad.mT @ h
                    grad_w = part.float() if grad_w is None else grad_w.add_(part)
                    del part  # else the next chunk's part is computed beside it: a third head-sized tensor
                del grad
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last dim, overwriting ``logits``: torch.logsumexp would hold a second chunk-sized
    temporary (the shifted exponentials), the largest tensor of the loss's forward."""
    peak = logits.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)  # all -inf (or an inf) stays what logsumexp gives
    return logits.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One chunk's logits in fp32, computed in ``dtype`` as F.linear would."""
    h = h.to(dtype)
    out = h @ w.mT if b is None else torch.addmm(b, h, w.mT)
    return out.float()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=..., reduction=...)`` for hidden
    (tokens × hidden) and targets (tokens), in fp32, without ever holding the tokens × vocab logits.

    ``reduction``: "mean" over the tokens whose target is not ``ignore_index`` (NaN if there are none, as
    F.cross_entropy gives), or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"invalid reduction={reduction!r}: expected 'mean' or 'sum'")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size!r}: expected an integer ≥ 1")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (tokens × hidden) and targets (tokens), got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    total = _ChunkedCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size, ignore_index,
                                          _matmul_dtype(hidden))
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def causal_lm_loss(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   bias: torch.Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   ignore_index: int = IGNORE_INDEX, num_items_in_batch: int | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """HF's causal-LM loss (``ForCausalLMLoss``) from the final hidden states (batch × seq × hidden) and the
    head, chunked: the labels are shifted left by one (the last position predicts nothing), then the mean over
    counted tokens, or the sum divided by ``num_items_in_batch`` when given."""
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_items_in_batch is None:
        return chunked_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size, ignore_index=ignore_index)
    total = chunked_cross_entropy(hidden, weight, targets, bias, chunk_size=chunk_size, ignore_index=ignore_index,
                                  reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ------------------------------------------------------------ in a HF causal LM's forward

# HF causal LMs whose forward is exactly ``lm_head(decoder(...).last_hidden_state)``, then ForCausalLMLoss: no
# logit scaling or soft-capping, no auxiliary loss. Others keep their own forward.
CHUNKABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def chunked_loss_refusal(model: torch.nn.Module) -> str | None:
    """Why :func:`use_chunked_loss` cannot compute ``model``'s loss exactly as its own forward does; None if it can."""
    name = type(model).__name__
    if name not in CHUNKABLE:
        return f"{name} is not one of {', '.join(CHUNKABLE)}, whose forward the chunked loss reproduces"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"{name}'s output head is a {type(head).__name__}, not an nn.Linear"
    return None


def use_chunked_loss(model: torch.nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.nn.Module:
    """Make ``model(..., labels=...)`` compute its loss with :func:`causal_lm_loss`, in place: the decoder's
    hidden states go to the head chunk by chunk, and the output's ``logits`` is None. A call without labels
    (generation, plain logits) runs the model's own forward.

    The model is still called as a whole, so wrappers' hooks (DDP's, FSDP2's all-gathers of the head and
    embeddings) run as before; tied embeddings work, since the head's weight is read at each call."""
    refusal = chunked_loss_refusal(model)
    if refusal is not None:
        raise ValueError(f"cannot use the chunked loss: {refusal}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"invalid chunk_size={chunk_size!r}: expected an integer ≥ 1")
    model.chunked_loss_size = chunk_size
    # A method bound to the model (not a closure) so that copy.deepcopy binds the copy's to the copy.
    model.forward = types.MethodType(_chunked_forward, model)
    return model


def _chunked_forward(self, input_ids=None, labels=None, **kwargs):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None:
        return type(self).forward(self, input_ids=input_ids, **kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)  # a loss needs every position
    outputs = self.get_decoder()(input_ids=input_ids, **kwargs)
    head = self.get_output_embeddings()
    hidden = outputs[0]
    if shift_labels is None:
        loss = causal_lm_loss(hidden, head.weight, labels, head.bias, chunk_size=self.chunked_loss_size,
                              ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    else:
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                     shift_labels.reshape(-1).to(hidden.device), head.bias,
                                     chunk_size=self.chunked_loss_size, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))
