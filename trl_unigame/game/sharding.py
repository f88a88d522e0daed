"""FSDP2, DeepSpeed and the game: sharding on a CPU, and the full parameters that the game's own forwards need.

Three things accelerate does not do for the game:

- On a CPU, accelerate never shards: its state enables FSDP only on accelerator devices (a CPU run stays
  `MULTI_CPU`, so `fsdp=...` in the training arguments, or an FSDP config with `use_cpu: true`, would train plain
  data-parallel copies). [`shard_on_cpu`] turns such a run into the FSDP2 run that was asked for; `fully_shard` itself
  runs on a CPU with the gloo backend.
- On a CPU, accelerate starts DeepSpeed's process group (DeepSpeed's CPU accelerator, gloo) but then records no
  backend and one process, so every process would train alone. [`complete_deepspeed_on_cpu`] records the group that
  DeepSpeed started, so ZeRO shards across the processes as on GPUs.
- Under FSDP2 (and DeepSpeed ZeRO-3) each process holds a shard of every parameter, gathered by hooks around the
  forward of each sharded module. The game calls submodules directly (mining's generation loop, the pictures'
  answers, the evaluator), and processes may make different numbers of such calls (uneven evaluation rows, one
  process drawing pictures).
  [`full_parameters`] gathers every parameter once, for all processes together, and keeps them gathered without a
  collective until it exits, as TRL's `unwrap_model_for_generation` does for sharded engines.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


_gathered = 0  # how many `full_parameters` contexts with sharded modules are open


def parameters_gathered() -> bool:
    """Whether a [`full_parameters`] context holds sharded parameters whole right now: `generate` then needs no
    `synced_gpus` (which it turns on for FSDP-managed models, and which waits for every process at every token)."""
    return _gathered > 0


@contextmanager
def _zero3_unhooked(engine):
    """DeepSpeed's `deepspeed.runtime.zero.unwrap_model_for_generation`, made exception-safe: every parameter gathered
    and the engine's fetch-and-release hooks removed inside; the hooks are registered again on the way out whatever
    happens inside (DeepSpeed's own version leaves them removed when the body raises, and every later forward would
    then run on empty partitions)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextmanager
def zero3_gathered(module: torch.nn.Module):
    """The parameters of `module` whole inside the context when DeepSpeed ZeRO-3 partitioned them (a collective:
    every process enters together); a no-op otherwise (FSDP2's hooks gather what a forward needs). For code that reads
    a weight directly rather than through a forward, such as a VQ codebook lookup."""
    partitioned = _zero3_partitioned(module)
    if not partitioned or _gathered:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield module


def _zero3_partitioned(module: torch.nn.Module) -> list:
    """The parameters of `module` that DeepSpeed ZeRO-3 partitioned (an engine, or `deepspeed.zero.Init`)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def fsdp2_modules(model: torch.nn.Module) -> list:
    """The FSDP2-sharded modules of `model` (`fully_shard`), outermost first; empty when it is not sharded."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


# The oldest torch the FSDP2 paths run on in the tests (pyproject's floor): `FSDPModule`, `unshard`/`reshard` and the
# setters are public from earlier releases, but FSDP2's private state read below changed shape before it.
MIN_FSDP2_TORCH = (2, 13)
# The torch releases on which `_FSDP2PrivateState` was checked against FSDP2's sources.
FSDP2_PRIVATE_STATE_CHECKED_ON = ("2.13",)


def _torch_release() -> tuple[int, ...]:
    from packaging.version import Version

    return Version(str(torch.__version__)).release


def check_fsdp2_torch() -> None:
    """Refuses a torch older than the FSDP2 paths are tested on.

    Raises:
        RuntimeError: naming this torch and the release needed.
    """
    if _torch_release()[:2] < MIN_FSDP2_TORCH:
        floor = ".".join(map(str, MIN_FSDP2_TORCH))
        raise RuntimeError(
            f"UniGame under FSDP needs torch>={floor} (found {torch.__version__}): the game's direct calls of sharded "
            f"submodules (mining, the generation check, evaluation) are tested on FSDP2 from torch {floor}. Upgrade "
            "torch, or train with DDP or DeepSpeed."
        )


class _FSDP2PrivateState:
    """The only code that touches FSDP2's private state, for the two things its public API does not give (checked on
    the torch releases in `FSDP2_PRIVATE_STATE_CHECKED_ON`):

    - setting up the root before a submodule's first forward ([`full_parameters`] before any training forward);
    - reading back, and restoring, what `set_reshard_after_forward`, `set_reshard_after_backward` and
      `set_requires_gradient_sync` set (they have no getters).

    Args:
        module (`torch.distributed.fsdp.FSDPModule`): A module that `fully_shard` sharded.

    Raises:
        RuntimeError: this torch's FSDP2 state is not the one checked (a release older than `MIN_FSDP2_TORCH`, or a
            newer one that changed it).
    """

    GROUP_FIELDS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")

    def __init__(self, module):
        check_fsdp2_torch()
        state_of = getattr(module, "_get_fsdp_state", None)
        self.state = state_of() if state_of is not None else None
        self.groups = list(getattr(self.state, "_fsdp_param_groups", None) or [])
        if (
            not hasattr(self.state, "_fsdp_param_groups")
            or not hasattr(self.state, "_lazy_init")
            or not hasattr(self.state, "_auto_reshard_after_forward")
            or not all(hasattr(g, f) for g in self.groups for f in self.GROUP_FIELDS)
        ):
            raise RuntimeError(
                f"FSDP2's internal state in torch {torch.__version__} differs from the one UniGame's "
                f"`full_parameters` was checked on (torch {', '.join(FSDP2_PRIVATE_STATE_CHECKED_ON)}). Install a "
                "checked torch release, or train with DDP or DeepSpeed; please report the torch version."
            )

    def set_up_root(self) -> None:
        """Makes this module FSDP2's root, as its first forward would (a no-op once a forward has run)."""
        self.state._lazy_init()

    def settings(self) -> tuple:
        """What the setters have set on this module, for [`~_FSDP2PrivateState.restore`]."""
        groups = [tuple(getattr(g, f) for f in self.GROUP_FIELDS) for g in self.groups]
        return self.state._auto_reshard_after_forward, groups

    def restore(self, settings: tuple) -> None:
        auto, groups = settings
        self.state._auto_reshard_after_forward = auto
        for group, values in zip(self.groups, groups):
            for field, value in zip(self.GROUP_FIELDS, values):
                setattr(group, field, value)


@contextmanager
def _fsdp2_whole_without_collectives(modules: list):
    """FSDP2 `modules` (outermost first) set, through the public setters, to neither reshard after a forward or a
    backward nor reduce gradients inside the context; their settings as they were afterwards."""
    states = [_FSDP2PrivateState(module) for module in modules]
    # FSDP2 takes the first module to run forward for its root: a submodule called first (mining before any
    # training forward) would otherwise take itself for the root.
    states[0].set_up_root()
    saved = [state.settings() for state in states]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.set_reshard_after_backward(False, recurse=False)
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for state, settings in zip(states, saved):
            state.restore(settings)


def is_deepspeed_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine (`trainer.model_wrapped` under DeepSpeed), without importing DeepSpeed
    (an engine exists only once it is imported)."""
    import sys

    engine_type = getattr(sys.modules.get("deepspeed"), "DeepSpeedEngine", None)
    return engine_type is not None and isinstance(model, engine_type)


def deepspeed_zero3_engine(model: torch.nn.Module):
    """`model` when it is a DeepSpeed engine training under ZeRO stage 3 (parameters partitioned), else `None`. The
    module an engine wraps carries ZeRO-3's partition attributes but no link to the engine: pass the engine."""
    return model if is_deepspeed_engine(model) and model.zero_optimization_stage() == 3 else None


@contextmanager
def full_parameters(model: torch.nn.Module):
    """Every parameter of a sharded `model` whole, on every process, inside the context; a no-op otherwise.

    - FSDP2 (`fully_shard`): entering gathers the parameters (one all-gather per sharded module: every process must
      enter together). Inside, forwards and backwards neither re-gather, reshard nor reduce gradients, so processes
      may call any submodule any number of times, independently. Exiting reshards and restores each module's
      settings.
    - DeepSpeed ZeRO-3 (pass the engine, `trainer.model_wrapped`): every parameter gathered and the engine's
      fetch-and-release hooks removed until it exits, as DeepSpeed's `unwrap_model_for_generation` does, but with the
      hooks put back even when the body raises (every process must enter together). A model that
      `deepspeed.zero.Init` partitioned while loading, before an engine exists: [`zero3_gathered`].

    Memory: the whole model is held on each process inside the context. Nested inside another such context, it
    leaves the parameters gathered.

    Raises:
        RuntimeError: under FSDP2, on a torch whose FSDP2 it was not checked on (see [`check_fsdp2_torch`]).
    """
    global _gathered
    engine = deepspeed_zero3_engine(model)
    if engine is not None or _zero3_partitioned(model):
        if _gathered:
            yield model
            return
        # an engine's model, or one that `deepspeed.zero.Init` partitioned at loading, before any engine exists
        with _zero3_unhooked(engine) if engine is not None else zero3_gathered(model):
            _gathered += 1
            try:
                yield model
            finally:
                _gathered = max(_gathered - 1, 0)
        return
    modules = fsdp2_modules(model)
    if not modules or _gathered:
        yield model
        return
    with _fsdp2_whole_without_collectives(modules):
        try:
            for module in modules:
                module.unshard()
            _gathered += 1
            yield model
        finally:
            _gathered = max(_gathered - 1, 0)
            for module in modules:
                module.reshard()


def reshard(model: torch.nn.Module) -> None:
    """Reshards every FSDP2 module of `model` that holds its parameters whole; a no-op otherwise.

    After a training step in which [`full_parameters`] ran, FSDP2 leaves the root module's parameters (those outside
    the wrapped layers: the embeddings, the tied output head) whole after the step's backward, as it does after a
    forward; the game reshards them at the end of each micro-batch, as the step without mining ends.
    """
    for module in fsdp2_modules(model):
        module.reshard()


def complete_deepspeed_on_cpu(state) -> bool:
    """Completes accelerate's `PartialState` for DeepSpeed on a machine without an accelerator; returns whether it did.

    accelerate initialises DeepSpeed's process group (on a CPU DeepSpeed picks gloo) but, finding no accelerator
    backend, records `backend=None` and a single process. This records the process group's backend, size and ranks
    instead. A no-op unless the state is DeepSpeed's, has no backend, and a process group of several processes exists.
    """
    from accelerate.utils import DistributedType

    if (
        state is None
        or state.distributed_type != DistributedType.DEEPSPEED
        or state.backend is not None
        or not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_world_size() < 2
    ):
        return False
    state.backend = torch.distributed.get_backend()
    state.num_processes = torch.distributed.get_world_size()
    state.process_index = torch.distributed.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", state.process_index))
    return True


def fsdp_requested(args) -> bool:
    """Whether the run asked for FSDP: `fsdp` in the training arguments, or an accelerate FSDP config."""
    return bool(getattr(args, "fsdp_plugin_args", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def shard_on_cpu(trainer) -> bool:
    """Makes a CPU run that asked for FSDP2 shard (see the module's docstring); returns whether it did.

    Call after the host has created its accelerator and before `prepare`: the accelerator's state is switched to FSDP
    with the run's plugin (from `fsdp_config`, else from accelerate's `FSDP_*` environment), so `prepare` applies
    `fully_shard` and the `Trainer` takes its FSDP paths (optimizer after `prepare`, sharded checkpoints).

    Raises:
        ValueError: FSDP version 1 was asked for on a CPU (only FSDP2 is supported there).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(trainer.args):
        return False
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(
            "FSDP on a CPU runs with FSDP2 only: set `fsdp_config={'version': 2}` (or `fsdp_version: 2` in the "
            "accelerate config)."
        )
    # Both shared states: accelerate rebuilds `AcceleratorState` from `PartialState` when it is asked for it again.
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    trainer.is_fsdp_enabled = True
    if plugin.activation_checkpointing and getattr(trainer.args, "activation_checkpointing", False):
        raise ValueError(
            "`fsdp_config['activation_checkpointing']` (FSDP's own activation checkpointing) and the "
            "`activation_checkpointing` training argument can't both be set to True: use FSDP's."
        )
    return True


def check_deepspeed_options(trainer) -> None:
    """Refuses game settings that DeepSpeed would run wrongly without an error.

    Under DeepSpeed the engine takes the optimizer step inside the backward (accelerate's wrapper), so
    `understanding_update="separate"`, whose buffer step clips, checks and steps after its own backward, would neither
    clip nor catch a non-finite update.

    Raises:
        ValueError: `understanding_update="separate"` under DeepSpeed.
    """
    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.args.understanding_update == "separate":
        raise ValueError(
            "`understanding_update='separate'` is not supported under DeepSpeed: the engine steps inside the backward, "
            "so the separate buffer step could neither clip its gradient nor drop a non-finite update. Use "
            "`understanding_update='mixed'` (the default), or DDP or FSDP2."
        )


def check_fsdp_options(trainer) -> None:
    """Refuses an FSDP run on a torch older than the one tested ([`check_fsdp2_torch`]), and FSDP settings under which
    the run would lose its LoRA adapter without an error.

    FSDP's own activation checkpointing (`fsdp_config['activation_checkpointing']`) wraps each layer in a
    `CheckpointWrapper`, which puts `_checkpoint_wrapped_module` into the modules' names but not into the state dict's
    keys; PEFT finds the adapter's weights by module name, finds none, and saves (and resumes) an empty adapter.

    Raises:
        RuntimeError: torch older than `MIN_FSDP2_TORCH`.
        ValueError: a PEFT model with FSDP's own activation checkpointing.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    check_fsdp2_torch()
    from peft import PeftModel

    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.activation_checkpointing and isinstance(trainer.model, PeftModel):
        raise ValueError(
            "FSDP's own activation checkpointing (`fsdp_config['activation_checkpointing']`, `fsdp_activation_checkpointing: "
            "true`) renames the wrapped layers, and PEFT then finds none of the adapter's weights: the LoRA adapter "
            "would be saved, and resumed, empty. Turn it off and set the training argument `activation_checkpointing="
            "True` (`--activation_checkpointing true`) instead: the model checkpoints its own layers, under FSDP too."
        )
