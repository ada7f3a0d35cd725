"""Run by tests/test_hf.py as `torchrun --nproc-per-node 2 hf_ddp_run.py OUT_DIR`: Trainer with slimopt's SUMO,
DDP over gloo on the CPU, 2 rows per rank of a 4-row dataset; each rank saves its final parameters and the
logged losses to OUT_DIR/rank{r}.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_hf import EXACT, Tokens, factory, losses, tiny_llama, train, training_args

out_dir = Path(sys.argv[1])
args = training_args(out_dir / "ddp", max_steps=3, per_device_train_batch_size=2, ddp_backend="gloo",
                     ddp_find_unused_parameters=False, optim_args=EXACT)
model = tiny_llama()
trainer = train(model, args, data=Tokens(4), **factory(args, "sumo", model))
params = {name: p.detach().clone() for name, p in model.named_parameters()}
torch.save({"params": params, "losses": losses(trainer)}, out_dir / f"rank{dist.get_rank()}.pt")
