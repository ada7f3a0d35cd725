"""The chunked causal-LM loss: HF's loss and gradients, without a tokens × vocab tensor saved for backward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from slimopt.train.loss import causal_lm_loss, chunked_cross_entropy, chunked_loss_refusal, use_chunked_loss

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

TOKENS, HIDDEN, VOCAB = 37, 16, 50


def inputs(bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(TOKENS, HIDDEN, generator=generator, requires_grad=True)
    W = torch.randn(VOCAB, HIDDEN, generator=generator, requires_grad=True)
    b = torch.randn(VOCAB, generator=generator, requires_grad=True) if bias else None
    targets = torch.randint(VOCAB, (TOKENS,), generator=generator)
    targets[::4] = -100
    return h, W, b, targets


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 5, TOKENS, 1000])  # 5 does not divide 37
def test_value_and_gradients_equal_cross_entropy_on_the_full_logits(chunk_size, reduction, bias):
    h, W, b, targets = inputs(bias)
    ours = chunked_cross_entropy(h, W, targets, b, chunk_size=chunk_size, reduction=reduction)
    reference = F.cross_entropy(F.linear(h, W, b), targets, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for a, r in zip(grads(ours, (h, W, b)), grads(reference, (h, W, b))):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_ignored_tokens_get_no_gradient_and_all_ignored_is_nan_as_cross_entropy():
    h, W, b, targets = inputs()
    (grad_h,) = torch.autograd.grad(chunked_cross_entropy(h, W, targets, b, chunk_size=6), h)
    assert torch.all(grad_h[targets == -100] == 0) and torch.all(grad_h[targets != -100].abs().sum(1) > 0)
    nothing = torch.full_like(targets, -100)
    assert torch.isnan(chunked_cross_entropy(h, W, nothing, b)) and torch.isnan(F.cross_entropy(h @ W.T, nothing))


def test_bf16_autocast_upcasts_the_logits_as_hf_does():
    """Under autocast the head's matmul runs in bf16 and its logits are upcast to fp32 before the log-softmax."""
    h, W, b, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(h, W, targets, b, chunk_size=8)
        logits = F.linear(h, W, b)
    reference = F.cross_entropy(logits.float(), targets)
    assert ours.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    gh, gW, gb = grads(ours, (h, W, b))
    assert (gh.dtype, gW.dtype, gb.dtype) == (torch.float32,) * 3
    for a, r in zip((gh, gW, gb), grads(F.cross_entropy(F.linear(h, W, b), targets), (h, W, b))):
        torch.testing.assert_close(a, r, rtol=0.02, atol=2e-3)  # bf16 matmuls against fp32 ones


def test_nothing_tokens_by_vocab_is_saved_for_backward():
    h, W, b, targets = inputs()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = chunked_cross_entropy(h, W, targets, b, chunk_size=8)
    loss.backward()
    assert saved and all(TOKENS * VOCAB > torch.Size(shape).numel() for shape in saved), saved
    assert (TOKENS, HIDDEN) in saved  # h itself, which the head's matmul saves anyway

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(F.linear(h, W, b), targets)
    assert max(torch.Size(shape).numel() for shape in saved) == TOKENS * VOCAB  # what it avoids


def test_causal_lm_loss_shifts_the_labels_as_hf():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 9, HIDDEN, generator=generator)
    W = torch.randn(VOCAB, HIDDEN, generator=generator)
    labels = torch.randint(VOCAB, (3, 9), generator=generator)
    labels[1, :5] = -100
    logits = hidden @ W.T
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(hidden, W, labels, chunk_size=4), expected, rtol=1e-6, atol=1e-6)
    summed = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(causal_lm_loss(hidden, W, labels, chunk_size=4, num_items_in_batch=torch.tensor(40)),
                               summed / 40, rtol=1e-6, atol=1e-6)


def tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                        tie_word_embeddings=tie))


@pytest.mark.parametrize("tie", [False, True])
def test_a_chunked_llama_gives_hf_loss_and_gradients(tie):
    model = tiny_llama(tie)
    chunked = use_chunked_loss(copy.deepcopy(model), chunk_size=5)  # 5 does not divide 3 × 9
    assert (chunked.lm_head.weight is chunked.model.embed_tokens.weight) == tie
    ids = torch.randint(64, (3, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100
    expected = model(input_ids=ids, labels=labels)
    output = chunked(input_ids=ids, labels=labels)
    assert output.logits is None
    torch.testing.assert_close(output.loss, expected.loss, rtol=1e-6, atol=1e-6)
    expected.loss.backward()
    output.loss.backward()
    for (name, p), q in zip(model.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(chunked(input_ids=ids).logits, model(input_ids=ids).logits)  # no labels: HF's own


def test_deepcopy_binds_the_copys_forward_to_the_copy():
    chunked = use_chunked_loss(tiny_llama(False), chunk_size=5)
    twin = copy.deepcopy(chunked)
    with torch.no_grad():
        twin.lm_head.weight.zero_()
    ids = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(3))
    assert twin(input_ids=ids, labels=ids).loss.item() == pytest.approx(torch.log(torch.tensor(64.0)).item())
    assert chunked(input_ids=ids, labels=ids).loss.item() != pytest.approx(torch.log(torch.tensor(64.0)).item())


def test_other_architectures_are_refused():
    assert chunked_loss_refusal(tiny_llama(False)) is None
    with pytest.raises(ValueError, match="is not one of"):
        use_chunked_loss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-pure"])
def test_the_memory_estimate_of_the_chunked_loss_is_within_5_percent_of_the_saved_tensors(dtype):
    from slimopt.bench.memory import activation_bytes
    from slimopt.train.models import PRECISIONS, build_model

    precision = PRECISIONS[dtype]
    model = use_chunked_loss(build_model("tiny", vocab_size=512, seq_len=64, seed=0, dtype=precision.weights))
    x = torch.randint(0, 512, (2, 64))
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=precision.autocast, enabled=precision.autocast is not None)):
        model(input_ids=x, labels=x)
    measured = sum(storages.values())
    estimated = activation_bytes(model, 2, 64, dtype, chunked_loss=True)
    assert abs(estimated - measured) / measured < 0.05, (estimated, measured)
    assert estimated < activation_bytes(model, 2, 64, dtype) - 2 * 64 * 512 * 4 * 0.9
