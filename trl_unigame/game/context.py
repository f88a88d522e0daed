"""The per-step context: what one micro-batch of the game knows, handed from `training_step` to each part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .adversary import SiteCapture
from .buffer_pass import BufferBatch


# The key under which the context rides with the batch from the trainer's `training_step` to its `compute_loss`.
STEP_KEY = "_unigame_step"


@dataclass
class StepContext:
    """One micro-batch of the game.

    Args:
        inputs (`dict`): The clean batch, prepared for the model.
        rows (`list[dict]`, *optional*): The batch's rows (question, answer, prompt, ...) for mining.
        step (`int`): The optimizer step this micro-batch belongs to.
        window (`int`): Micro-batches in this accumulation window.
        last_micro_batch (`bool`): Whether the optimizer steps after this micro-batch.
        normalised_over_window (`bool`): Whether the host's loss is already normalised over the window (TRL hosts
            given `num_items_in_batch`), so the Trainer does not divide it by `window`.
        num_items_in_batch: The Trainer's count of items in the window, passed to the host's loss.
        buffer_batch ([`BufferBatch`], *optional*): The batch drawn from the buffer for the mixed update.
        capture ([`SiteCapture`], *optional*): Records the clean pass's visual tokens (first-order perturber step).
        merged_rows (`tuple[int, int]`, *optional*): `(clean, total)` when the clean and buffer rows ran as one batch,
            clean rows first.
    """

    inputs: dict[str, Any]
    rows: list[dict[str, Any]] | None
    step: int
    window: int
    last_micro_batch: bool
    normalised_over_window: bool = False
    num_items_in_batch: Any = None
    buffer_batch: BufferBatch | None = None
    capture: SiteCapture | None = None
    merged_rows: tuple[int, int] | None = None

    @property
    def share(self) -> float:
        """The factor that makes a mean loss over this micro-batch its share of the window's loss."""
        return 1.0 if self.normalised_over_window else 1.0 / self.window
