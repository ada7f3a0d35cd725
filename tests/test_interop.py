"""Interoperability with torch.optim: a torch optimizer's checkpoint loads into its slimopt counterpart."""

import torch

import slimopt


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]


def _step(optimizer, params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer.step()


def test_torch_adamw_state_dict_loads_into_slimopt_adamw():
    """torch counts AdamW's step in a float32 tensor, slimopt in an int64 one: a run can resume from
    torch.optim.AdamW (e.g. HF Trainer's default optimizer) with slimopt.AdamW and continue identically."""
    hparams = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    params = _params()
    reference = torch.optim.AdamW(params, **hparams)
    for seed in range(2):
        _step(reference, params, seed)
    assert reference.state_dict()["state"][0]["step"].dtype == torch.float32

    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = slimopt.AdamW(resumed_params, **hparams)
    resumed.load_state_dict(reference.state_dict())
    for seed in range(2, 4):
        _step(reference, params, seed)
        _step(resumed, resumed_params, seed)
    for a, b in zip(params, resumed_params):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert int(resumed.state_dict()["state"][0]["step"]) == 4
