"""Agreement between processes: every process takes the same decision, from the same numbers, at the same call.

DDP synchronises buffers in each forward and all-reduces in each backward, and TRL hosts gather metrics, so every
process must run the same passes; a non-finite update is dropped everywhere or nowhere. Sharded engines (FSDP,
DeepSpeed) add their cases here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support holds no sharded gradients
    DTensor = ()

from .sharding import is_deepspeed_engine


class Agreement:
    """The collectives the game needs, through the host's `accelerate.Accelerator`.

    Args:
        accelerator (`accelerate.Accelerator`): The host trainer's accelerator.
        device (`torch.device`): Where the votes are exchanged.
    """

    def __init__(self, accelerator, device):
        self.accelerator = accelerator
        self.device = device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on at least one process."""
        return self.any_processes([flag])[0]

    def any_processes(self, flags: list[bool]) -> list[bool]:
        """For each flag, whether it holds on at least one process: one collective for all of them."""
        if self.num_processes == 1:
            return list(flags)
        votes = torch.tensor([float(f) for f in flags], device=self.device)
        return (self.accelerator.reduce(votes, reduction="sum") > 0).tolist()

    def mean_if_finite(self, tensors: list[torch.Tensor], finite: bool) -> list[torch.Tensor] | None:
        """The mean of `tensors` over processes, or `None` when any process had `finite=False` or the mean is not
        finite. The flag travels with the tensors: one collective, one decision everywhere."""
        flat = torch.cat(
            [t.flatten() for t in tensors]
            + [torch.ones(1, device=tensors[0].device, dtype=tensors[0].dtype) * float(finite)]
        )
        if self.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum") / self.num_processes
        if not (bool(flat[-1] == 1) and bool(torch.isfinite(flat).all())):
            return None
        return [part.view_as(t) for part, t in zip(torch.split(flat[:-1], [t.numel() for t in tensors]), tensors)]

    def step_dropped(self, model: nn.Module, scaler=None) -> bool:
        """After the backward of an optimizer step's last micro-batch: whether its update is dropped because a
        gradient is not finite.

        A DeepSpeed engine steps inside the backward (at the accumulation boundary) and skips a step whose gradient
        norm is not finite itself, on every process (its gradients live in the engine's partitions, not in `p.grad`):
        this asks it whether the step was applied. Otherwise [`~Agreement.drop_non_finite_gradients`] drops the update
        before the optimizer's step, or, with an fp16 `scaler`, leaves the skip to it."""
        if is_deepspeed_engine(model):
            if not model.was_step_applied():
                return True
            norm = model.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                raise RuntimeError(
                    "DeepSpeed applied an update whose gradient norm is not finite: this engine configuration does "
                    "not check for overflow (ZeRO stage 0, `compute_grad_norm: false`, or `bf16.check_grad_overflow: "
                    "false`). Use ZeRO stage 1-3 with gradient clipping (`max_grad_norm > 0`) and keep the overflow "
                    "check on, so a non-finite step is skipped."
                )
            return False
        return self.drop_non_finite_gradients(model, scaler)

    def gradients_finite(self, params) -> bool:
        """Whether every `.grad` of `params` is finite: one flag per tensor on the device, one host read for all of
        them. Sharded gradients (FSDP2's `DTensor`s) are checked shard by shard and the processes vote in the same
        read, so every process takes the same decision."""
        grads = [p.grad for p in params if p.grad is not None]
        sharded = any(isinstance(g, DTensor) for g in grads)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        bad = (~all_finite(local, self.device)).float().reshape(1)
        if sharded and self.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return not bool(bad.sum() > 0)

    def drop_non_finite_gradients(self, model: nn.Module, scaler=None) -> bool:
        """After the (all-reduced) backward of a step: whether a gradient is not finite, in which case the update is
        dropped, on every process alike (the gradients are the same everywhere, or voted on when sharded).

        Without a scaler every gradient is cleared, so the optimizer leaves every weight as it is (`None` gradients
        are skipped, weight decay included). With an fp16 `scaler` (`GradScaler`) the gradients stay: the scaler
        finds the overflow in its unscale, skips the optimizer's step and lowers its scale (cleared gradients would
        leave it no overflow check to record, and its `update()` would raise)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params or self.gradients_finite(params):
            return False
        if scaler is None:
            for p in params:
                p.grad = None
        return True


def all_finite(tensors, device=None) -> torch.Tensor:
    """Whether every element of every tensor in `tensors` is finite, as a boolean tensor on `device` (the first
    tensor's by default; `True` for none): one flag per tensor, combined on the device, so the caller reads the host
    once for all of them."""
    flags = [torch.isfinite(t).all().to(device or t.device) for t in tensors if t.numel()]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(flags).all()


def check_one_run_across_processes(args) -> None:
    """Refuses a run whose processes were launched together but train apart: each would train its own copy of the
    model and write it to the same `output_dir`, with no error.

    Raises:
        RuntimeError: naming the process count and the launches that train as one run.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    launched = torch.distributed.get_world_size()
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"{launched} processes were launched together, but the Trainer runs in each of them alone (parallel mode "
            f"{args.parallel_mode.value}, world size 1): they would train {launched} separate copies of the model and "
            "write them to one `output_dir`. This happens with `accelerate launch --config_file` and an FSDP or "
            "DeepSpeed config on a CPU, which accelerate does not shard by itself. To shard on a CPU with FSDP2, add "
            "the training argument `--use_cpu true` (examples/accelerate_configs/fsdp_cpu.yaml); with DeepSpeed, keep "
            "`use_cpu: false` in the config (examples/accelerate_configs/zero3_cpu.yaml) and `pip install deepspeed`. "
            "Or launch "
            f"data-parallel training (on a CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes "
            f"{launched}`, or `torchrun --nproc_per_node {launched}` with `ddp_backend='gloo'`), or run one process."
        )
