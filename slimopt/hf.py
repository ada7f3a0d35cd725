"""slimopt with Hugging Face: transformers' Trainer, TRL's SFTTrainer, PEFT and accelerate.

    import slimopt.hf
    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=slimopt.hf.optimizer_cls_and_kwargs(args, "sumo", model=model))
    # or, built by hand (after any PEFT wrapping):
    trainer = Trainer(model, args, optimizers=(slimopt.hf.build_optimizer(model, "sumo", rank=128), None))

Routing (``slimopt.param_groups``): the hidden linear layers and the fused 3-D experts of MoE models
(transformers 5.x Mixtral, Qwen2-MoE, Qwen3-MoE: E matrices each) get the algorithm; embeddings, the LM head,
MoE routers and gates, norms and biases get AdamW, split into decayed and undecayed parameters by Trainer's
own rule, so that part is Trainer's AdamW baseline. LoRA factors (``lora_A``, ``lora_B``) get AdamW unless
``lora="algorithm"``.

RSO swaps the model's linear layers, so it is built before Trainer sees the model:
``build_optimizer(model, "rso", ...)`` and ``Trainer(optimizers=(optimizer, None))``, or
``slimopt.rso.apply`` with an optimizer of your own and :class:`RSOCallback`. :func:`save_merged`
saves the plain architecture.
"""

from __future__ import annotations

import inspect
import os
from functools import partial
from pathlib import Path

from packaging.version import Version
from torch import nn

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import check_target_module_exists
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("slimopt.hf needs transformers: pip install 'slimopt[hf]'") from error

from slimopt.optim import SUMO, SWAN, AdamW, GaLore, SlimOptimizer, param_groups
from slimopt.optim.advice import warn_about_embeddings
from slimopt.optim.algorithm import check_int, check_number
from slimopt.optim.apollo import APOLLO, APOLLOMini
from slimopt.optim.groups import is_conv1d, is_fused_experts, is_router, matrix_routes
from slimopt.optim.optimizer import FallbackWarning, warn_user
from slimopt.rso import RSO, Adaptation, RSOLinear

OPTIMIZERS = {"adamw": AdamW, "galore": GaLore, "sumo": SUMO, "swan": SWAN, "rso": RSO, "apollo": APOLLO,
              "apollo_mini": APOLLOMini}
# Module name components of PEFT's LoRA factors, and where they train by default.
LORA_FACTORS = ("lora_A", "lora_B")
LORA_POLICIES = ("adamw", "algorithm")
# build_optimizer's own arguments, besides the optimizer classes' (RSO's targets come from target_modules).
# rank and update_gap are among them so that one call builds any algorithm: adamw and swan ignore them.
OWN_ARGS = ("lr", "adamw_lr", "weight_decay", "betas", "eps", "rank", "update_gap", "target_modules", "lora")
# transformers 5.2 made Trainer call a non-Optimizer `optimizer_cls` as a factory: optimizer_cls()(model, **kwargs).
FACTORY_VERSION = Version("5.2")


def build_optimizer(model: nn.Module, algorithm: str, *, lr: float = 1e-3, adamw_lr: float | None = None,
                    weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, rank: int | None = None,
                    update_gap: int | None = None, target_modules: str | list[str] | None = None,
                    lora: str = "adamw", **options) -> SlimOptimizer:
    """One slimopt optimizer for ``model``, grouped as Trainer's AdamW would be, plus the matrix algorithm.

    Args:
        algorithm: ``"adamw"``, ``"galore"``, ``"sumo"``, ``"swan"``, ``"apollo"``, ``"apollo_mini"`` or
            ``"rso"`` (RSO swaps the hidden linear layers in place; refused on PEFT models, whose linear
            layers PEFT has wrapped).
        lr, weight_decay, betas, eps: for every group; biases and norm weights get no weight decay
            (Trainer's ``get_decay_parameter_names``).
        adamw_lr: the lr of the AdamW fallback group (embeddings, heads, a fresh classifier, norms, biases),
            so that those train alike under every algorithm (e.g. at AdamW's tuned lr) while ``lr`` is the
            algorithm's for the hidden matrices (with ``"adamw"``: the hidden matrices and LoRA factors at
            ``lr``, the rest at ``adamw_lr``). Default None: ``lr`` for every group.
        rank, update_gap: of GaLore, SUMO, APOLLO and RSO (default: theirs); ignored by adamw and swan, and
            APOLLO-Mini (``"apollo_mini"``, rank 1) takes update_gap only.
        target_modules: the linear layers (and fused MoE experts) the algorithm trains, matched by module name
            as Trainer matches ``optim_target_modules`` (a list: names containing an entry; a string: a regex
            on the full name); routers and gates never; ``None`` or ``"all-linear"``: every hidden linear layer
            and the fused experts, the output head and routers excepted.
        lora: ``"adamw"`` (default): PEFT's LoRA factors train with AdamW, as in PEFT's own recipes; a
            factor is a thin n × r matrix, which GaLore and SUMO would project onto its whole short side.
            ``"algorithm"``: they train with the algorithm like any other matrix.
        **options: the optimizer class's own hyperparameters (e.g. SUMO's ``orthogonalizer``, RSO's
            ``share_inputs``) and slimopt's options (``foreach``, ``stochastic_rounding``, ...).

    Warns once (``RoutingWarning``) when the algorithm would update the model's input or output embeddings
    (``get_input_embeddings``/``get_output_embeddings``, e.g. through ``target_modules``), and when the rank
    is ≥ a matrix's smaller side. At its first step the optimizer checks that it holds every trainable
    parameter of ``model``: one built before the model was wrapped (PEFT freezes the weights it holds) raises
    instead of training nothing.
    """
    check_options(algorithm, {"lora": lora, **options})
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    subspace = {k: v for k, v in (("rank", rank), ("update_gap", update_gap)) if v is not None}
    shared = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    if adamw_lr is not None:
        check_number({"adamw_lr": adamw_lr}, "adamw_lr", low=0.0)
    if algorithm == "rso":
        optimizer = _build_rso(model, target_modules, adamw_lr, **shared, **subspace, **options)
    else:
        cls = OPTIMIZERS[algorithm]
        matrix_hparams = subspace if algorithm in ("galore", "sumo", "apollo") else {}
        if algorithm == "apollo_mini":  # rank 1 by definition: only its refresh gap
            matrix_hparams = {k: v for k, v in subspace.items() if k == "update_gap"}
        groups = _named_groups(model, algorithm, target_modules, lora, matrix_hparams, adamw_lr)
        optimizer = cls(_split_by_decay(model, groups), **shared, **options)
        warn_about_embeddings(optimizer, known=_embeddings(model))  # by identity, if names did not tell
    _check_at_first_step(optimizer, model)
    return optimizer


def _embeddings(model: nn.Module) -> dict[int, str]:
    """id → name of the weights of the model's input and output embeddings (HF's accessors), where it has them."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = {}
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, accessor)()
        except (AttributeError, NotImplementedError, TypeError):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in names:
            found[id(weight)] = names[id(weight)]
    return found


def check_options(algorithm: str, options: dict) -> None:
    """Raise ValueError on an unknown algorithm, LoRA policy or hyperparameter name, before anything is built."""
    if algorithm not in OPTIMIZERS:
        raise ValueError(f"invalid algorithm={algorithm!r}: expected one of {sorted(OPTIMIZERS)}")
    lora = options.get("lora", "adamw")
    if lora not in LORA_POLICIES:
        raise ValueError(f"invalid lora={lora!r}: expected one of {list(LORA_POLICIES)}")
    accepted = set(OWN_ARGS)
    for function in (OPTIMIZERS[algorithm].__init__, SlimOptimizer.__init__):
        accepted |= {name for name, p in inspect.signature(function).parameters.items()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted -= {"self", "params", "model", "defaults", "targets"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"invalid hyperparameter(s) {unknown} for algorithm={algorithm!r}: expected names "
                         f"among {sorted(accepted)}")


def _named_groups(model, algorithm, target_modules, lora, matrix_hparams, adamw_lr=None) -> list[dict]:
    """The matrix group(s) and the AdamW group, with names, as ``slimopt.param_groups`` splits them; the AdamW
    group at ``adamw_lr`` where one is given."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if algorithm == "adamw":
        if adamw_lr is None:
            return [{"params": trainable}]
        # The hidden matrices and the LoRA factors at lr, the rest at adamw_lr: the split every algorithm gets.
        layouts, adamw_ids, _ = matrix_routes(model, is_matrix=_matrix_rule(model, target_modules, "algorithm"))
        hidden = [(n, p) for n, p in trainable if id(p) in layouts and id(p) not in adamw_ids]
        held = {id(p) for _, p in hidden}
        rest = [(n, p) for n, p in trainable if id(p) not in held]
        return [g for g in ({"params": hidden}, {"params": rest, "lr": adamw_lr}) if g["params"]]
    is_matrix = _matrix_rule(model, target_modules, lora)
    layouts, adamw_ids, _ = matrix_routes(model, is_matrix=is_matrix)
    if not any(id(p) in layouts and id(p) not in adamw_ids for _, p in trainable):
        if lora == "adamw" and any(_is_lora(name) for name, _ in trainable):
            warn_user(f"slimopt.hf: every trainable matrix of {type(model).__name__} is a LoRA factor, and LoRA "
                      f"factors train with AdamW (lora='adamw'), so algorithm {algorithm!r} updates nothing; pass "
                      "lora='algorithm' to train them with it", FallbackWarning)
            return [{"params": trainable, "algorithm": "adamw"}]
        if target_modules is not None and not _all_linear(target_modules):
            raise ValueError(f"invalid target_modules={target_modules!r}: matches no trainable linear layer or "
                             f"MoE experts of {type(model).__name__}")
    adamw = None if adamw_lr is None else {"lr": adamw_lr}
    return param_groups(model, is_matrix=is_matrix, adamw=adamw, **matrix_hparams)


def _matrix_rule(model, target_modules, lora):
    """``is_matrix(name, param, module)`` for ``param_groups``: LoRA factors by the policy; with target_modules,
    the weights of the linear layers and the 3-D weights of the fused MoE experts whose module names match
    (as Trainer matches ``optim_target_modules``); otherwise the default rule."""
    if target_modules is not None and not isinstance(target_modules, (str, list, tuple)):
        raise ValueError(f"invalid target_modules={target_modules!r}: expected a list of module names, a regex "
                         "string or 'all-linear'")

    def is_matrix(name: str, param, module: nn.Module):
        module_name = name.rpartition(".")[0]
        if lora == "adamw" and _is_lora(module_name):
            return False
        if target_modules is None or _all_linear(target_modules):
            return None  # the default rule: hidden linear layers and fused MoE experts
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        linear_weight = (isinstance(module, nn.Linear) or is_conv1d(module)) and param is module.weight
        experts = is_fused_experts(module) and param.ndim == 3
        if not (linear_weight or experts) or is_router(module_name, module) or min(param.shape[-2:]) < 2:
            return False
        return bool(check_target_module_exists(targets, module_name))

    return is_matrix


def _all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"


def _is_lora(name: str) -> bool:
    return bool(set(name.split(".")) & set(LORA_FACTORS))


def _split_by_decay(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Each named group in two by Trainer's own rule: its parameters named like biases and norms get
    weight_decay 0. (An instance method of Trainer that reads nothing of the instance.)"""
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    split = []
    for group in groups:
        for decays in (True, False):
            params = [(name, p) for name, p in group["params"] if (name in decayed) == decays]
            if params:
                split.append({**group, "params": params, **({} if decays else {"weight_decay": 0.0})})
    return split


def _build_rso(model, target_modules, adamw_lr=None, **hparams) -> RSO:
    if hasattr(model, "peft_config"):
        raise ValueError(f"RSO cannot train {type(model).__name__}, a PEFT model: RSO replaces the hidden linear "
                         "layers, which PEFT has wrapped and frozen. Use RSO for full fine-tuning, or another "
                         "algorithm with PEFT")
    if target_modules is not None and not _all_linear(target_modules):
        patterns = target_modules if isinstance(target_modules, str) else list(target_modules)
        targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
                   and bool(check_target_module_exists(patterns, name))]
        if not targets:
            raise ValueError(f"invalid target_modules={target_modules!r}: matches no linear layer of "
                             f"{type(model).__name__}")
        hparams["targets"] = targets
    optimizer = RSO(model, **hparams)
    # RSO groups the model itself (B's and the rest); regroup by Trainer's decay rule before any step.
    groups = [{**{k: v for k, v in group.items() if k not in ("params", "param_names")},
               "params": list(zip(group["param_names"], group["params"]))} for group in optimizer.param_groups]
    if adamw_lr is not None:
        groups = [{**group, "lr": adamw_lr} if group["algorithm"] == "adamw" else group for group in groups]
    optimizer.param_groups.clear()
    for group in _split_by_decay(model, groups):
        optimizer.add_param_group(group)
    return optimizer


def _check_at_first_step(optimizer: SlimOptimizer, model: nn.Module) -> None:
    """Before the first step, refuse what would silently train the wrong thing.

    - a matrix group was flattened since it was built (DeepSpeed ZeRO-1/2 swaps each group's parameters
      for one flat partition): each parameter is checked again as when the optimizer was built;
    - ``model`` has trainable parameters the optimizer lacks: it was built before the model was wrapped or
      unfrozen (PEFT freezes the base weights and adds LoRA parameters, in place).
    """
    checked = False

    def check(optimizer, args, kwargs):
        # Stays registered after the first step: removing a hook from inside it would break the hooks after it.
        nonlocal checked
        if checked:
            return
        for group in optimizer.param_groups:  # first: flattening also swaps the parameters for others
            for index, param in enumerate(group["params"]):
                optimizer.check_param(param, group, index)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing and not any(p.requires_grad for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(
                f"the optimizer holds none of the {len(missing)} trainable parameters of {type(model).__name__} "
                f"(e.g. {missing[0]}): it was built before the model was wrapped, e.g. by PEFT's get_peft_model "
                "or SFTTrainer(peft_config=...), which freeze the weights it holds and add LoRA parameters. Build "
                "it after wrapping, or let Trainer build it: "
                "Trainer(optimizer_cls_and_kwargs=slimopt.hf.optimizer_cls_and_kwargs(args, algorithm))")
        if missing:
            raise RuntimeError(f"{len(missing)} trainable parameters of {type(model).__name__} are not in the "
                               f"optimizer and would never train (e.g. {missing[:3]}): it was built before they "
                               "were added or unfrozen; build it afterwards")
        checked = True

    optimizer.register_step_pre_hook(check)


# ------------------------------------------------------------------ Trainer


def parse_optim_args(optim_args: str | None) -> dict:
    """``TrainingArguments.optim_args`` such as ``"rank=128,update_gap=200"`` as build_optimizer keywords.

    Values become int, float, bool (``true``/``false``) or stay strings; the optimizer checks their ranges.
    Keys TrainingArguments has fields for (lr, weight_decay, betas, eps) are refused.
    """
    options = {}
    for item in (optim_args or "").split(","):
        if not item.strip():
            continue
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise ValueError(f"invalid optim_args={optim_args!r}: {item.strip()!r} is not key=value")
        if key in ("lr", "weight_decay", "betas", "eps"):
            raise ValueError(f"invalid optim_args={optim_args!r}: set {key} through TrainingArguments "
                             "(learning_rate, weight_decay, adam_beta1/adam_beta2, adam_epsilon)")
        if key in options:
            raise ValueError(f"invalid optim_args={optim_args!r}: {key!r} is given twice")
        options[key] = _parse_value(value)
    return options


def _parse_value(text: str):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def hparams_from_args(args) -> dict:
    """build_optimizer's keywords from ``TrainingArguments``: learning_rate, weight_decay, adam_beta1/2,
    adam_epsilon, optim_target_modules and optim_args."""
    hparams = dict(lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                   eps=args.adam_epsilon)
    if args.optim_target_modules is not None:
        hparams["target_modules"] = args.optim_target_modules
    return {**hparams, **parse_optim_args(args.optim_args)}


class TrainerFactory:
    """What transformers ≥ 5.2 calls as ``optimizer_cls()(model, **kwargs)`` when Trainer creates its
    optimizer, with the model it trains (PEFT-wrapped by then, if SFTTrainer was given a peft_config)."""

    def __call__(self, model: nn.Module, **kwargs) -> SlimOptimizer:
        return build_optimizer(model, **kwargs)


def optimizer_cls_and_kwargs(args, algorithm: str, model: nn.Module | None = None) -> tuple:
    """For ``Trainer(optimizer_cls_and_kwargs=...)``: Trainer builds the optimizer on its final model, with
    the hyperparameters of ``args`` (:func:`hparams_from_args`).

    transformers ≥ 5.2 hands the factory the model it trains. Older versions call ``optimizer_cls`` with
    their own param groups: pass ``model`` (the one given to Trainer; PEFT wraps it in place), whose
    modules route those parameters, and which must hold exactly the parameters Trainer trains.

    RSO is refused here: it swaps the model's layers, which must happen before Trainer loads a checkpoint
    to resume; build it with :func:`build_optimizer` and pass ``Trainer(optimizers=(optimizer, None))``.
    """
    if algorithm == "rso":
        raise ValueError("algorithm='rso' cannot be built by Trainer: RSO swaps the model's linear layers, which "
                         "must happen before Trainer loads a checkpoint to resume from. Build it first, optimizer "
                         "= slimopt.hf.build_optimizer(model, 'rso', ...), and pass "
                         "Trainer(optimizers=(optimizer, None))")
    hparams = hparams_from_args(args)
    check_options(algorithm, hparams)
    if Version(transformers.__version__) >= FACTORY_VERSION:
        return TrainerFactory, {"algorithm": algorithm, **hparams}
    if model is None:
        raise ValueError(f"transformers {transformers.__version__} calls the optimizer with Trainer's own param "
                         "groups, which do not say which parameter is which: pass model=, the model given to Trainer")
    return partial(_build_for_trainer_groups, model, algorithm), hparams


def _build_for_trainer_groups(model: nn.Module, algorithm: str, trainer_groups: list[dict], **hparams):
    """transformers < 5.2: Trainer's groups say which parameters it trains; ``model``'s modules route them."""
    optimizer = build_optimizer(model, algorithm, **hparams)
    trained = {id(p) for group in trainer_groups for p in group["params"]}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if trained != held:
        raise ValueError(f"model={type(model).__name__} passed to slimopt.hf.optimizer_cls_and_kwargs is not the "
                         f"model Trainer trains: Trainer trains {len(trained)} parameters, it has {len(held)} "
                         f"trainable ones, {len(trained & held)} of them shared")
    return optimizer


class RSOCallback(TrainerCallback):
    """RSO with an optimizer of your own (e.g. torch's AdamW over the B's): every ``update_gap`` optimizer
    steps, merge each B Pᵀ into its weight, draw new projections, and drop the B's optimizer state, so the
    next subproblem starts a fresh Adam.

        adaptation = slimopt.rso.apply(model, rank=128)
        optimizer = torch.optim.AdamW(adaptation.param_groups(), lr=1e-3)
        Trainer(model, args, optimizers=(optimizer, None), callbacks=[RSOCallback(adaptation, update_gap=200)])

    It keeps no state of its own: the subproblem ends at ``global_step % update_gap == 0``, and the model's
    state dict holds the B's and each projection's seed and subproblem, so a resumed run continues
    exactly. Your optimizer's weight decay reaches the B's only (``slimopt.rso.RSO`` decays W_k too).
    """

    def __init__(self, adaptation: Adaptation, update_gap: int):
        check_int({"update_gap": update_gap}, "update_gap", low=1)
        self.adaptation = adaptation
        self.update_gap = update_gap

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step % self.update_gap == 0:
            for B in self.adaptation.resample():
                optimizer.state.pop(B, None)


def save_merged(model: nn.Module, out_dir: str | os.PathLike, **save_pretrained_kwargs) -> None:
    """``model.save_pretrained(out_dir)`` as its plain architecture: each RSO layer's weight saved as
    W_k + B Pᵀ, without B and the projections, so the stock class (e.g. ``LlamaForCausalLM``) loads it.

    ``model`` itself is left as it is, RSO layers and all; only the merged weights are computed anew.
    """
    state_dict = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, RSOLinear):
            prefix = f"{name}." if name else ""
            for key in [k for k in state_dict if k.startswith(prefix) and k != f"{prefix}bias"]:
                del state_dict[key]
            state_dict[f"{prefix}weight"] = module.merged_weight()
    model.save_pretrained(out_dir, state_dict=state_dict, **save_pretrained_kwargs)
    from slimopt.data.cache import ordinary_permissions  # safetensors writes 0600; a model directory is shared

    ordinary_permissions(Path(out_dir), only=list(Path(out_dir).glob("*.safetensors")))


__all__ = [
    "RSOCallback",
    "TrainerFactory",
    "build_optimizer",
    "check_options",
    "hparams_from_args",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "save_merged",
]
