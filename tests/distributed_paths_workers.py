"""Workers for tests/test_distributed_paths.py: the FSDP2 paths users take, each run in every rank of a forked
gloo group on CPU.

- empty local shards (a hidden matrix, a 2-row head and a 1-element bias that some ranks hold no rows of);
- torch's own ``get/set_optimizer_state_dict`` with ``dcp.save``/``dcp.load`` (sharded) and ``torch.save``
  (full state dict, rank 0);
- accelerate's ``prepare(model, optimizer)``, ``save_state`` and ``load_state``;
- transformers' ``Trainer`` with FSDP2, saving a checkpoint and resuming from it.

accelerate and Trainer do not shard on a CPU. ``AcceleratorState`` turns the FSDP plugin on only for
accelerator devices: the ``distributed_type = DistributedType.FSDP`` / ``fsdp_plugin = fsdp_plugin``
assignments sit inside ``elif self.distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]``
(accelerate/state.py:986-1016 in accelerate 1.15). With ``cpu=True`` the state is ``MULTI_CPU`` and the plugin
is dropped without a word (``Accelerator(cpu=True, fsdp_plugin=...)`` ends up with no ``state.fsdp_plugin``;
Trainer then reads ``is_fsdp_enabled = False``, trainer.py:875, and trains with DDP). Without ``cpu=True`` and
without a GPU each rank gets ``DistributedType.NO`` and thinks it is alone. :func:`enable_fsdp_on_cpu` makes
exactly the assignments accelerate makes on a GPU; everything after (``_prepare_fsdp2``,
``fsdp2_prepare_model``, ``fsdp2_switch_optimizer_parameters``, ``save_fsdp_model``/``save_fsdp_optimizer``,
``load_fsdp_*``, Trainer's checkpointing) is accelerate's and Trainer's own code, unchanged. Control runs with
``torch.optim.AdamW`` show the shim itself resumes exactly.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_workers import CONFIG, batches, full_state, max_difference, rows_of, shard, tiny_llama
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import slimopt

STEPS = 6
SAVED_AT = 3
# Short: a rank stuck in a collective fails the test within this, instead of hanging it.
GLOO_TIMEOUT = 30


def run(rank: int, world: int, tmp: str, store: str, worker, args) -> None:
    """One rank: the process group on a file store, the env vars accelerate and Trainer read, one thread."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GLOO_TIMEOUT))
    try:
        worker(rank, world, tmp, *args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def save_report(rank: int, tmp: str, report, filename: str = "report.pt") -> None:
    if rank == 0:
        torch.save(report, os.path.join(tmp, filename))


# ------------------------------------------------------------------ optimizers

# Each with a subspace refresh (update_gap=3) inside the 6 steps. SUMO and SWAN on their exact routes: the bf16
# route ("auto" on a CPU with fast bf16) is not reproducible to 1e-6 across gradients an ulp apart.
SMALL = {
    "sumo": lambda groups: slimopt.SUMO(groups, lr=1e-2, rank=2, update_gap=3, orthogonalizer="eigh"),
    "swan": lambda groups: slimopt.SWAN(groups, lr=1e-3, whitening="eigh"),
    "galore": lambda groups: slimopt.GaLore(groups, lr=1e-2, rank=2, update_gap=3),
    "adamw": lambda groups: slimopt.AdamW(groups, lr=1e-2),
    # The fp64-free route, on the owner ranks as in one process (test_distributed_paths: its own bound).
    "sumo_express": lambda groups: slimopt.SUMO(groups, lr=1e-2, rank=2, update_gap=3, orthogonalizer="polar_express"),
    "swan_express": lambda groups: slimopt.SWAN(groups, lr=1e-3, whitening="polar_express"),
}
LLAMA = {
    "sumo": lambda groups: slimopt.SUMO(groups, lr=1e-2, rank=4, update_gap=3, orthogonalizer="eigh"),
    "swan": lambda groups: slimopt.SWAN(groups, lr=1e-3, whitening="eigh"),
    "galore": lambda groups: slimopt.GaLore(groups, lr=1e-2, rank=4, update_gap=3),
    "adamw": lambda groups: slimopt.AdamW(groups, lr=1e-2),
    "torch_adamw": None,  # control: torch's own AdamW through the same path
}


def build(name: str, model: nn.Module, setups=LLAMA):
    if name == "torch_adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return setups[name](slimopt.param_groups(model, adamw={"lr": 3e-3}))


def llama_loss(model, rows):
    return model(input_ids=rows, labels=rows).loss


def train(model, optimizer, data, start=0, stop=STEPS, loss_of=llama_loss, backward=None):
    for step in range(start, stop):
        loss = loss_of(model, data[step])
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def split_batches(rank: int, world: int) -> list[torch.Tensor]:
    return [rows_of(b, rank, world) for b in batches(STEPS)]


def single_process(name: str) -> dict[str, torch.Tensor]:
    """The reference: a plain tiny LLaMA, the whole batch, in this process (no process group)."""
    model = tiny_llama()
    train(model, build(name, model), batches(STEPS))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ 1. empty local shards

class Uneven(nn.Module):
    """dim 0 of every parameter splits unevenly under torch.chunk, so that some ranks hold none of its rows:

    | parameter          | shape  | world 3 | world 4    | group   |
    |--------------------|--------|---------|------------|---------|
    | up.weight, .bias   | (9, 6) | 3 3 3   | 3 3 3 0    | matrix, AdamW |
    | mid.weight         | (5, 9) | 2 2 1   | 2 2 1 0    | matrix  |
    | down.weight        | (4, 5) | 2 2 0   | 1 1 1 1    | matrix  |
    | head.weight        | (2, 4) | 1 1 0   | 1 1 0 0    | matrix (a 2-label head) |
    | score.weight, .bias| (1, 4) | 1 0 0   | 1 0 0 0    | AdamW (a 1-output head, a 1-element bias) |
    """

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 9)
        self.mid = nn.Linear(9, 5, bias=False)
        self.down = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 2, bias=False)
        self.score = nn.Linear(4, 1)

    def forward(self, x, labels, target):
        h = torch.tanh(self.down(torch.tanh(self.mid(torch.tanh(self.up(x))))))
        # Two independent labels (multi-label): a 2-class softmax's gradient would be rank 1 ([g; -g]), whose
        # second direction, rounding noise, SUMO and GaLore at rank 2 would orthogonalize to full size.
        labelled = nn.functional.binary_cross_entropy_with_logits(self.head(h), labels)
        return labelled + (self.score(h).squeeze(-1) - target).square().mean()


UNEVEN_BATCH = 12  # divisible by 3 and by 4: every rank averages the same number of rows


def uneven_model(world: int | None = None) -> Uneven:
    torch.manual_seed(0)
    model = Uneven()
    if world is not None:
        mesh = init_device_mesh("cpu", (world,))
        for child in model.children():
            fully_shard(child, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def uneven_data() -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(UNEVEN_BATCH, 6, generator=generator),
             torch.randint(0, 2, (UNEVEN_BATCH, 2), generator=generator).float(),
             torch.randn(UNEVEN_BATCH, generator=generator)) for _ in range(STEPS)]


def uneven_loss(model, batch):
    return model(*batch)


def local_rows(model) -> dict[str, int]:
    return {n: (p.to_local() if isinstance(p, DTensor) else p).shape[0] for n, p in model.named_parameters()}


def empty_shards(rank, world, tmp, names, tolerance):
    """FSDP2 with empty local shards against one process, each rank its rows of the batch."""
    rows = local_rows(uneven_model(world))
    if rank == world - 1:  # the premise: the last rank holds no rows of the head, nor of the bias
        assert rows["head.weight"] == rows["score.bias"] == 0, rows
    data = uneven_data()
    mine = [tuple(t.chunk(world)[rank] for t in batch) for batch in data]
    report = {}
    for name in names:
        # On a failure, says which optimizer it was: a mismatched gloo collective aborts the rank (SIGABRT) with
        # only gloo's "Received data size doesn't match expected size" on stderr.
        print(f"rank {rank} of {world}: {name}", file=sys.stderr, flush=True)
        reference = uneven_model()
        train(reference, build(name, reference, SMALL), data, loss_of=uneven_loss)
        model = uneven_model(world)
        train(model, build(name, model, SMALL), mine, loss_of=uneven_loss)
        report[name] = max_difference(full_state(model), dict(reference.state_dict()))
    save_report(rank, tmp, report)
    for name, difference in report.items():
        assert difference <= tolerance, f"{name} at world {world}: FSDP2 differs from one process by {difference:.3g}"


# ------------------------------------------------------------------ 2. torch's state-dict helpers + DCP

DCP_MODES = {
    "sharded": StateDictOptions(),
    "sharded_flat": StateDictOptions(flatten_optimizer_state_dict=True),
    # What accelerate and Trainer use for FULL_STATE_DICT (offload_to_cpu=True, rank0_only=True).
    "full": StateDictOptions(full_state_dict=True, cpu_offload=True),
}
FULL_LOAD = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def sharded_llama(world: int, name: str):
    model = shard(tiny_llama(), init_device_mesh("cpu", (world,)))
    return model, build(name, model)


def dcp_save(rank, world, tmp, names):
    """After 3 steps, save in every mode; then steps 4-6, which must equal an uninterrupted run (saving changes
    nothing). Reports the finals, that difference, and which params the full state dict lacks state for."""
    data = split_batches(rank, world)
    report = {"finals": {}, "perturbed": {}, "full_missing": {}, "full_params": {}}
    for name in names:
        model, optimizer = sharded_llama(world, name)
        train(model, optimizer, data)
        report["finals"][name] = full_state(model)

        # What one process's optimizer holds after 3 steps: the keys every param's state must have.
        plain = tiny_llama()
        single = build(name, plain)
        train(plain, single, batches(STEPS), stop=SAVED_AT)
        by_name = {id(p): n for n, p in plain.named_parameters()}
        expected = {by_name[id(p)]: sorted(s) for p, s in single.state.items() if s}

        model, optimizer = sharded_llama(world, name)
        train(model, optimizer, data, stop=SAVED_AT)
        for mode, options in DCP_MODES.items():
            where = os.path.join(tmp, f"{name}-{mode}")
            state = {"model": get_model_state_dict(model, options=options),
                     "optim": get_optimizer_state_dict(model, optimizer, options=options)}
            if mode == "full":
                if rank == 0:
                    held = state["optim"]["state"]
                    report["full_missing"][name] = sorted(n for n, keys in expected.items()
                                                          if sorted(held.get(n) or {}) != keys)
                    report["full_params"][name] = len(expected)
                    torch.save(state, where + ".pt")
            else:
                dcp.save(state, checkpoint_id=where)
        train(model, optimizer, data, start=SAVED_AT)
        report["perturbed"][name] = max_difference(full_state(model), report["finals"][name])
    save_report(rank, tmp, report, "saved.pt")


def dcp_resume(rank, world, tmp, name, mode):
    """Fresh processes: load the step-3 checkpoint through torch's helpers, steps 4-6, equal to the uninterrupted
    run exactly."""
    finals = torch.load(os.path.join(tmp, "saved.pt"))["finals"][name]
    data = split_batches(rank, world)
    model, optimizer = sharded_llama(world, name)
    where = os.path.join(tmp, f"{name}-{mode}")
    options = DCP_MODES[mode]
    if mode == "full":  # torch's documented full load: rank 0 reads the file and broadcasts
        state = torch.load(where + ".pt") if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, state["model"], options=FULL_LOAD)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=FULL_LOAD)
    else:
        state = {"model": get_model_state_dict(model, options=options),
                 "optim": get_optimizer_state_dict(model, optimizer, options=options)}
        dcp.load(state, checkpoint_id=where)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    train(model, optimizer, data, start=SAVED_AT)
    difference = max_difference(full_state(model), finals)
    assert difference == 0, f"{name} ({mode}): resumed run differs from the uninterrupted one by {difference:.3g}"


# ------------------------------------------------------------------ 3. accelerate

def enable_fsdp_on_cpu(accelerator, fsdp_plugin) -> None:
    """What AcceleratorState.__init__ does with an FSDP plugin on a GPU (accelerate/state.py:1010-1016, and :1037,
    which copies the type into PartialState, whence every later AcceleratorState() reads it back), which its device
    check skips on a CPU; see the module docstring."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = fsdp_plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2


def fresh_accelerate_state() -> None:
    """A forked rank inherits the parent's accelerate singletons (an earlier test in the same pytest process may
    have made them): start from none."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def accelerator_fsdp2(state_dict_type: str = "SHARDED_STATE_DICT"):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    fresh_accelerate_state()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    enable_fsdp_on_cpu(accelerator, plugin)
    return accelerator


def accelerate_prepared(name, state_dict_type="SHARDED_STATE_DICT"):
    """accelerate's FSDP2 flow: the optimizer is built on the unsharded model, then prepare() shards the model
    and swaps the optimizer's params for the DTensors (accelerate refuses a model or optimizer prepared alone)."""
    accelerator = accelerator_fsdp2(state_dict_type)
    model = tiny_llama()
    optimizer = build(name, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert all(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    return accelerator, model, optimizer


def accelerate_trains(rank, world, tmp, name, tolerance):
    """(a) prepare(model, optimizer) trains, and matches one process to rounding (each rank its rows)."""
    accelerator, model, optimizer = accelerate_prepared(name)
    train(model, optimizer, split_batches(rank, world), backward=accelerator.backward)
    difference = max_difference(full_state(model), single_process(name))
    assert difference <= tolerance, f"{name} via accelerate: differs from one process by {difference:.3g}"


def accelerate_save(rank, world, tmp, name, state_dict_type):
    """(b) save_state after step 3; the uninterrupted run goes on to step 6 and is kept."""
    accelerator, model, optimizer = accelerate_prepared(name, state_dict_type)
    data = split_batches(rank, world)
    train(model, optimizer, data, stop=SAVED_AT, backward=accelerator.backward)
    accelerator.save_state(os.path.join(tmp, f"accelerate-{name}"))
    train(model, optimizer, data, start=SAVED_AT, backward=accelerator.backward)
    save_report(rank, tmp, full_state(model), "uninterrupted.pt")


def accelerate_resume(rank, world, tmp, name, state_dict_type):
    accelerator, model, optimizer = accelerate_prepared(name, state_dict_type)
    accelerator.load_state(os.path.join(tmp, f"accelerate-{name}"))
    train(model, optimizer, split_batches(rank, world), start=SAVED_AT, backward=accelerator.backward)
    difference = max_difference(full_state(model), torch.load(os.path.join(tmp, "uninterrupted.pt")))
    assert difference == 0, f"{name} via accelerate load_state: resumed run differs by {difference:.3g}"


# ------------------------------------------------------------------ 4. transformers' Trainer

class Rows(torch.utils.data.Dataset):
    """Random token rows of one length: 2 ranks × 2 rows × 6 steps, one epoch."""

    def __init__(self, count=24):
        self.ids = torch.randint(0, CONFIG["vocab_size"], (count, 12), generator=torch.Generator().manual_seed(2))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer_fsdp2(rank, world, tmp, algorithm, state_dict_type, out_dir, resume_from):
    """Trainer with FSDP2 full sharding on the CPU (see enable_fsdp_on_cpu: without it Trainer would train this
    with DDP, is_fsdp_enabled False); 6 steps, a checkpoint every 3. Rank 0 saves the final full weights to
    out_dir/final.pt."""
    import accelerate
    import transformers.trainer
    from transformers import Trainer, TrainingArguments

    import slimopt.hf

    fresh_accelerate_state()

    class FSDPOnCPU(accelerate.Accelerator):
        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None:
                enable_fsdp_on_cpu(self, fsdp_plugin)

    transformers.trainer.Accelerator = FSDPOnCPU  # this forked rank only
    args = TrainingArguments(
        # fsdp=True with reshard_after_forward=True is fsdp="full_shard" (a string is deprecated in transformers 5).
        output_dir=out_dir, fsdp=True,
        fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "state_dict_type": state_dict_type},
        use_cpu=True, ddp_backend="gloo", per_device_train_batch_size=2, max_steps=STEPS,
        save_strategy="steps", save_steps=SAVED_AT, learning_rate=1e-2, weight_decay=0.1,
        optim_args="rank=4,update_gap=3", lr_scheduler_type="constant", logging_strategy="no", report_to=[],
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    model = tiny_llama()
    options = ({} if algorithm == "torch_adamw" else
               {"optimizer_cls_and_kwargs": slimopt.hf.optimizer_cls_and_kwargs(args, algorithm, model=model)})
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), **options)
    assert trainer.is_fsdp_enabled
    trainer.train(resume_from_checkpoint=resume_from)
    final = full_state(trainer.model)
    if rank == 0:
        torch.save(final, os.path.join(out_dir, "final.pt"))
