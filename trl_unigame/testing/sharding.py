"""Training arguments that shard a run over the CPU processes of one machine (gloo): FSDP2, or DeepSpeed ZeRO-2/3
on DeepSpeed's CPU accelerator. The distributed tests and the memory benchmark launch the game with them."""

from __future__ import annotations

import torch


SHARDING_ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def cpu_sharding_arguments(engine: str) -> dict:
    """Keyword arguments of [`UniGameConfig`] (or another UniGame config) that run `engine` on CPU processes launched
    together (e.g. `torchrun --nproc_per_node 2`).

    Args:
        engine (`str`):
            `"ddp"` (data-parallel copies), `"fsdp2"` (the Trainer's `fsdp` arguments, FSDP version 2, sharded state
            dicts), `"zero2"` or `"zero3"` (the Trainer's `deepspeed` argument; needs `pip install deepspeed`).
    """
    if engine == "ddp":
        return dict(use_cpu=True, ddp_backend="gloo")
    if engine == "fsdp2":
        return dict(
            use_cpu=True,
            ddp_backend="gloo",
            fsdp="full_shard",
            fsdp_config={
                "version": 2,
                "state_dict_type": "SHARDED_STATE_DICT",
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            },
        )
    if engine not in ("zero2", "zero3"):
        raise ValueError(f"Unknown sharding engine {engine!r}: use one of {SHARDING_ENGINES}.")
    zero = {"stage": int(engine[-1])}
    if engine == "zero3":
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # `save_model` writes the whole adapter
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }
    # Not `use_cpu`: accelerate takes DeepSpeed's path only without it; DeepSpeed finds no GPU and uses its CPU one.
    return dict(ddp_backend="gloo", deepspeed=config)


def local_elements(param) -> int:
    """Elements of `param` this process holds: its DTensor shard (FSDP2), its ZeRO-3 partition, or all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.to_local().numel()
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    return param.numel()


def full_elements(param) -> int:
    """Elements of `param` whole, however it is sharded."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def close_process_group() -> None:
    """Every process of a test's launch leaves its process group together before the interpreter exits: a gloo group
    torn down at exit, its threads still running, can abort the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
