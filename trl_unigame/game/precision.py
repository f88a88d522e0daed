"""Loss scaling under fp16: what the game reads from a backward that the host's scaler (or DeepSpeed's) has scaled.

Under `fp16=True` the host's backward runs on `loss * scale` (accelerate's `GradScaler`, or DeepSpeed's own loss
scaler), so every gradient it leaves, the one at the visual tokens included, is `scale` times too large. The scaler
finds overflows itself: it skips the update whose gradient is not finite and lowers its scale.
"""

from __future__ import annotations

import torch

from .sharding import is_deepspeed_engine


def active_grad_scaler(accelerator):
    """The host accelerator's `GradScaler` when it scales the backward (fp16 with a scaler), else `None`."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def backward_loss_scale(accelerator, model) -> float:
    """The factor by which the host's last backward scaled every gradient: the `GradScaler`'s current scale, DeepSpeed's
    loss scale under its fp16, else 1. Read once per call (the scaler's scale lives on the device).

    Args:
        accelerator (`accelerate.Accelerator`): The host trainer's accelerator.
        model (`torch.nn.Module`): The model as the host trains it (`trainer.model_wrapped`: a DeepSpeed engine
            under DeepSpeed).

    Raises:
        RuntimeError: under DeepSpeed fp16 when the engine's optimizer does not say its loss scale.
    """
    if is_deepspeed_engine(model):
        if not model.fp16_enabled():
            return 1.0
        scale = getattr(model.optimizer, "cur_scale", None)
        if scale is None:
            raise RuntimeError(
                f"DeepSpeed fp16 scales the loss, but its optimizer {type(model.optimizer).__name__} does not give its "
                "loss scale (`cur_scale`), so the gradient at the visual tokens cannot be unscaled for "
                "`perturber_update='first_order'`: use `perturber_update='exact'`, or bf16."
            )
        return float(scale)
    scaler = active_grad_scaler(accelerator)
    return 1.0 if scaler is None else float(scaler.get_scale())


def unscaled(gradient: torch.Tensor, scale: float) -> torch.Tensor:
    """`gradient / scale` in float32 (an fp16 gradient at a large scale would overflow on the way)."""
    gradient = gradient.float()
    return gradient if scale == 1.0 else gradient / scale
