"""The understanding player's passes: the clean batch (alone, or with the buffer rows in one batch), the buffer batch,
the perturbed batch and the generation pairs (the batch's or the anchors), each returned as a part of U's loss."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .buffer_pass import BufferPass
from .context import StepContext
from .loss import LossParts, compose_loss
from .metrics import GameMetrics


def host_normalises_over_window(host, num_items_in_batch) -> bool:
    """Whether the host trainer's loss comes normalised over the accumulation window, so that the Trainer does not
    divide it by the window (the Trainer's own rule, `loss_is_scaled_for_ga` first)."""
    declared = getattr(host, "loss_is_scaled_for_ga", None)
    if declared is not None:
        return bool(declared)
    if getattr(host, "compute_loss_func", None) is not None:
        return True
    return num_items_in_batch is not None and bool(getattr(host, "model_accepts_loss_kwargs", False))


@contextmanager
def host_metrics_paused(host):
    """The host trainer's own metrics (TRL's token accuracy, token count, rewards) describe the clean pass only: what
    the perturbed and buffer passes add to them inside this context is dropped. Their collectives still run, on every
    process alike."""
    metrics = getattr(host, "_metrics", None)
    saved = copy.deepcopy(metrics) if metrics is not None else None
    tokens = getattr(host, "_total_train_tokens", None)
    try:
        yield
    finally:
        if saved is not None:
            metrics.clear()
            metrics.update(saved)
        if tokens is not None:
            host._total_train_tokens = tokens


@dataclass
class HostHooks:
    """What the game needs from its host trainer, as callables (the game never imports the trainer).

    Args:
        loss (`Callable`): `(model, inputs, num_items_in_batch=None, return_outputs=False)` -> the host's loss.
        loss_per_sample (`Callable`): `(model, inputs)` -> `(mean, per-sample losses or None)`.
        metrics_paused (`Callable`): `()` -> a context manager in which the host's own metrics are left as they were.
        concatenate (`Callable`, *optional*): `(clean, buffer)` -> one batch or `None`; `None` when the host cannot
            run both in one forward.
    """

    loss: Callable
    loss_per_sample: Callable
    metrics_paused: Callable
    concatenate: Callable | None = None


class UnderstandingPasses:
    """Runs the passes of U's loss on one micro-batch and returns their [`LossParts`].

    Args:
        host ([`HostHooks`]): The host's loss functions.
        interface ([`VisualTokenInterface`]): The model's interface (source images, the generation loss).
        perturber ([`Perturber`]): The perturber (active, frozen, for the perturbed pass).
        buffer_pass ([`BufferPass`]): The buffer pass.
        args ([`UniGameArguments`]): The run's configuration.
        metrics ([`GameMetrics`]): Where the passes' metrics go.
    """

    def __init__(self, host: HostHooks, interface, perturber, buffer_pass: BufferPass, args, metrics: GameMetrics):
        self.host = host
        self.interface = interface
        self.perturber = perturber
        self.buffer_pass = buffer_pass
        self.args = args
        self.metrics = metrics
        # [`GenerationAnchors`] the generation loss trains on (`generation_loss_targets="anchors"`), set by the trainer
        self.anchors = None

    def parts(self, model, inputs: dict[str, Any], ctx: StepContext, return_outputs: bool = False):
        """The parts of U's loss and, with `return_outputs`, the host's outputs of the clean pass."""
        batch, merged = ctx.buffer_batch, None
        if batch is not None and not return_outputs and self.args.one_pass_update:
            merged, batch = self.buffer_pass.merge(inputs, batch, self.host.concatenate)
        buffer_loss = outputs = None
        with ctx.capture.recording() if ctx.capture is not None else nullcontext():
            if merged is not None:
                # One forward and backward over clean + buffer rows; each part keeps its own mean, as in two passes.
                n = len(inputs["input_ids"])
                ctx.merged_rows = (n, len(merged["input_ids"]))
                per_sample = self.host.loss_per_sample(model, merged)[1]
                clean, buffer_loss = per_sample[:n].mean(), per_sample[n:].mean()
                self.buffer_pass.note(batch, buffer_loss, per_sample[n:])
            else:
                result = self.host.loss(
                    model, inputs, num_items_in_batch=ctx.num_items_in_batch, return_outputs=return_outputs
                )
                clean, outputs = result if return_outputs else (result, None)
        if merged is None and batch is not None:
            with self.host.metrics_paused():
                buffer_loss = self.buffer_pass.loss(self.host.loss_per_sample, model, batch)
        parts = LossParts(clean=clean, buffer=buffer_loss, buffer_weight=batch.weight if batch is not None else 0.0)
        if self.args.perturbed_weight:
            gradient = None
            if self.perturber.sees_gradient and ctx.capture is not None:
                gradient = ctx.capture.site_gradient(clean, rows=ctx.merged_rows, retain_graph=True)
            with self.perturber.gradients(understanding=gradient):
                parts.perturbed = self.perturbed(model, inputs, ctx.num_items_in_batch)
            # logged as a mean over the micro-batch, as the clean loss is
            self.metrics.add("unigame/perturbed_loss", float(parts.perturbed.detach()) * ctx.share * ctx.window)
        if self.args.generation_loss_weight and self.anchors is not None:
            size = len(ctx.rows) if ctx.rows is not None else len(inputs["input_ids"])
            parts.generation = self.anchored_generation(model, size, ctx.step)
        elif self.args.generation_loss_weight and ctx.rows is not None:
            parts.generation = self.generation(model, inputs, ctx.rows)
        return parts, outputs

    def compose(self, parts: LossParts, ctx: StepContext) -> torch.Tensor:
        """U's loss from its parts ([`compose_loss`] with the run's weights and this step's window), logged."""
        args = self.args
        composed = compose_loss(
            parts,
            perturbed_weight=args.perturbed_weight,
            generation_weight=args.generation_loss_weight,
            max_buffer_ratio=args.buffer_max_loss_ratio,
            window=ctx.window,
            normalised_over_window=ctx.normalised_over_window,
        )
        self.metrics.add("unigame/clean_loss", composed.clean)
        if composed.buffer_weight is not None and args.buffer_max_loss_ratio is not None:
            self.metrics.add("unigame/buffer_weight", composed.buffer_weight)
        if composed.buffer_share is not None:
            self.metrics.add("unigame/buffer_loss_share", composed.buffer_share)
        self.metrics.add("unigame/buffer_size", len(self.buffer_pass.buffer))
        return composed.loss

    def perturbed(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """U's loss on the batch with the perturber's current perturbation active: the embedding-space adversarial
        samples. The perturbation is a fixed input here: U's gradient does not reach the perturber."""
        trainable = [p for p in self.perturber.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with self.perturber.active(), self.host.metrics_paused():
                loss = self.host.loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return loss

    def generation(self, model, inputs: dict[str, Any], rows: list[dict[str, Any]]) -> torch.Tensor:
        """The model's image-generation loss on the clean batch's (prompt, image) pairs (`generation_loss_weight`)."""
        images = self.interface.source_images(inputs)
        prompts = [r["prompt"] for r in rows]
        if images is None or len(images) != len(prompts):
            raise ValueError(
                "`generation_loss_weight` needs one image per row that the interface can recover from the batch "
                f"({type(self.interface).__name__}.source_images); set `generation_loss_weight=0` for this data."
            )
        return self._generation_loss(model, prompts, images)

    def anchored_generation(self, model, size: int, step: int) -> torch.Tensor:
        """The model's image-generation loss on `size` of its generation anchors (`generation_loss_targets="anchors"`):
        its own drawings from before fine-tuning."""
        prompts, images = self.anchors.batch(size, step, self.args.process_index)
        return self._generation_loss(model, prompts, images)

    def _generation_loss(self, model, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        loss = self.interface.generation_loss(model, prompts, images).mean()
        self.metrics.add("unigame/generation_loss", float(loss.detach()))
        return loss
