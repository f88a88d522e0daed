"""The understanding player's objective, composed from its parts by one pure function."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossParts:
    """The parts of U's loss on one micro-batch, each as the host computed it.

    Args:
        clean (`torch.Tensor`): The host's loss on the clean batch.
        buffer (`torch.Tensor`, *optional*): The mean loss on a batch drawn from the hard-sample buffer.
        buffer_weight (`float`): The drawn batch's weight `beta` (0 for a stand-in batch that only keeps the processes'
            passes in step).
        perturbed (`torch.Tensor`, *optional*): The host's loss on the clean batch with the perturbation active,
            normalised as `clean` is.
        generation (`torch.Tensor`, *optional*): The mean image-generation loss on the clean batch's pairs.
    """

    clean: torch.Tensor
    buffer: torch.Tensor | None = None
    buffer_weight: float = 0.0
    perturbed: torch.Tensor | None = None
    generation: torch.Tensor | None = None


@dataclass
class ComposedLoss:
    """`loss` to back-propagate, and what the composition decided (for the logs).

    `clean` is the clean loss as a mean over this micro-batch (undoing the host's normalisation over the accumulation
    window); `buffer_weight` is the weight the buffer's loss took after the cap (`None` without hard samples);
    `buffer_share` its share of `loss`.
    """

    loss: torch.Tensor
    clean: float
    buffer_weight: float | None = None
    buffer_share: float | None = None


def compose_loss(
    parts: LossParts,
    *,
    perturbed_weight: float = 0.0,
    generation_weight: float = 0.0,
    max_buffer_ratio: float | None = None,
    window: int = 1,
    normalised_over_window: bool = False,
) -> ComposedLoss:
    r"""
    `clean + beta * buffer + perturbed_weight * perturbed + generation_weight * generation`, scaled for the
    accumulation window.

    The Trainer divides the loss of each micro-batch by the window (`window` micro-batches per optimizer step), except
    when the host has already normalised it over the window (`normalised_over_window`: TRL hosts given
    `num_items_in_batch`). Then the clean and perturbed losses are already divided, and the batch means (buffer,
    generation) are divided here, so that every part weighs the same whichever way the host normalises.

    With `max_buffer_ratio` `r`, `beta` is lowered for this micro-batch so that `beta * buffer <= r * clean` (both as
    means over their batches); the cap is a constant of the step, with no gradient through it.

    Args:
        parts ([`LossParts`]): The parts.
        perturbed_weight (`float`): Weight of the perturbed loss.
        generation_weight (`float`): Weight of the generation loss.
        max_buffer_ratio (`float`, *optional*): The cap `r`.
        window (`int`): Micro-batches per optimizer step.
        normalised_over_window (`bool`): Whether the host normalised `clean` (and `perturbed`) over the window.
    """
    scale = 1.0 / window if normalised_over_window else 1.0
    clean_mean = float(parts.clean.detach()) / scale
    loss = parts.clean
    beta = share = None
    if parts.buffer is not None:
        weight = parts.buffer_weight
        if parts.buffer_weight > 0:
            if max_buffer_ratio is not None:
                weight = min(weight, max_buffer_ratio * clean_mean / max(float(parts.buffer.detach()), 1e-12))
            beta = weight
        loss = loss + scale * weight * parts.buffer
    if parts.perturbed is not None and perturbed_weight:
        loss = loss + perturbed_weight * parts.perturbed
    if parts.generation is not None and generation_weight:
        loss = loss + scale * generation_weight * parts.generation
    if beta is not None:  # the buffer's share of the clean + buffer objective, the part the cap bounds
        weighted = scale * beta * float(parts.buffer.detach())
        share = weighted / max(float(parts.clean.detach()) + weighted, 1e-12)
    return ComposedLoss(loss=loss, clean=clean_mean, buffer_weight=beta, buffer_share=share)
