"""The buffer pass: a batch drawn from the hard-sample buffer, its loss, and the three ways U trains on it (one mixed
pass, two mixed passes, or a separate optimizer step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..buffer import HardSampleBuffer
from ..selection import hardness as hardness_score
from .agreement import Agreement
from .metrics import GameMetrics


@dataclass
class BufferBatch:
    """A batch drawn from the buffer: its host inputs, the entries they came from and the weight of their loss (0 for
    a stand-in that only keeps this process's passes in step with the others)."""

    inputs: dict[str, Any]
    entries: list = field(default_factory=list)
    weight: float = 0.0

    @property
    def is_stand_in(self) -> bool:
        return not self.entries


class BufferPass:
    """Draws buffer batches and computes their loss, refreshing each drawn entry's hardness from it.

    Args:
        buffer ([`HardSampleBuffer`]): The hard-sample buffer.
        args ([`UniGameArguments`]): The run's configuration.
        metrics ([`GameMetrics`]): Where the pass's metrics go.
        agreement ([`Agreement`]): Collectives between processes.
        hard_sample_inputs (`Callable`): Entries -> the host's prepared inputs for them.
    """

    def __init__(
        self,
        buffer: HardSampleBuffer,
        args,
        metrics: GameMetrics,
        agreement: Agreement,
        hard_sample_inputs: Callable[[list], dict[str, Any]],
    ):
        self.buffer = buffer
        self.args = args
        self.metrics = metrics
        self.agreement = agreement
        self.hard_sample_inputs = hard_sample_inputs

    def draw(self, stand_in: dict[str, Any] | None) -> BufferBatch | None:
        """This step's buffer batch, or `None` when no process has one.

        Processes must run the same passes (DDP synchronises buffers in each forward, TRL hosts gather metrics), so
        when any process has hard samples, a process whose buffer is empty runs the pass on `stand_in` (its clean
        batch) with weight 0.
        """
        if self.args.buffer_weight == 0:
            return None
        entries = self.buffer.sample(self.args.buffer_batch_size)
        if not self.agreement.any_process(bool(entries)):
            return None
        if not entries:
            return BufferBatch(inputs=stand_in, entries=[], weight=0.0)
        return BufferBatch(inputs=self.hard_sample_inputs(entries), entries=entries, weight=self.args.buffer_weight)

    def loss(self, loss_per_sample: Callable, model, batch: BufferBatch) -> torch.Tensor:
        """The host's loss on a buffer batch (`loss_per_sample(model, inputs) -> (mean, per_sample or None)`)."""
        loss, per_sample = loss_per_sample(model, batch.inputs)
        self.note(batch, loss, per_sample)
        return loss

    def note(self, batch: BufferBatch, loss: torch.Tensor, per_sample: torch.Tensor | None) -> None:
        """Logs the buffer loss and rescores the drawn entries from their own per-sample losses, at no extra cost."""
        if batch.is_stand_in:
            return
        self.metrics.add("unigame/buffer_loss", float(loss.detach()))
        if per_sample is not None and len(per_sample) == len(batch.entries):
            args = self.args
            consistency = [e.consistency for e in batch.entries]
            s = None if any(c is None for c in consistency) else torch.tensor(consistency)
            h = hardness_score(
                per_sample.detach().float().cpu(), s, args.consistency_weight, args.consistency_threshold
            )
            self.buffer.rescore(batch.entries, h.tolist())

    def merge(
        self, inputs: dict[str, Any], batch: BufferBatch, concatenate: Callable | None
    ) -> tuple[dict[str, Any] | None, BufferBatch | None]:
        """For `one_pass_update`: the clean and buffer rows as one batch (clean rows first), and the buffer batch that
        still needs a pass of its own. Every process must run as many forwards, so all take one pass unless any
        process holds a buffer batch that cannot share its clean batch's forward; a stand-in adds no pass of its own
        in one pass.

        Args:
            inputs: The clean batch.
            batch: The drawn buffer batch.
            concatenate: `(clean, buffer) -> merged or None`; `None` when the host cannot merge at all.
        """
        if concatenate is None:
            return None, batch
        merged = concatenate(inputs, batch.inputs) if not batch.is_stand_in else None
        if self.agreement.any_process(not batch.is_stand_in and merged is None):
            return None, batch
        return merged, (None if batch.is_stand_in else batch)
