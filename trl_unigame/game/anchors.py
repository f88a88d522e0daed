"""Generation anchors: the model's own drawings of training prompts, drawn with its adapter off, as the targets of the
generation loss (`generation_loss_targets="anchors"`)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from ..interfaces.base import to_uint8
from .metrics import GameMetrics
from .mining import mining_seed


# Offsets the anchors' generator seed from mining's, so an anchor is not the clean twin of a mining candidate.
ANCHOR_SEED_OFFSET = 32_452_843


def adapter_disabled(model):
    """A context in which `model`'s PEFT adapter does not act (the model as it was loaded)."""
    return model.disable_adapter()


def has_adapter(model) -> bool:
    """Whether `model` is a PEFT model whose adapter can be switched off for a pass."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class GenerationAnchors:
    """Drawings of the prompts of the first `capacity` rows the run trains on, made by the model with its PEFT adapter
    off (the generator as it was loaded) and its perturber off, with the run's guidance and temperature. They are the
    targets of the generation loss: it then holds the generator where it started, what it could draw beyond the
    fine-tuning data included, instead of teaching it the fine-tuning images.

    Prompts come from the batches themselves (each row's `prompt`), so any dataset and host trainer work; each batch
    draws its rows' prompts in one call until `capacity` drawings are held. A prompt that several rows share gets as
    many drawings (other samples of the same generator), so data with few distinct captions still anchors the
    generator's spread, not one drawing of each. A resumed run draws its anchors again
    from the batches after the checkpoint: the same generator, other draws of it.

    Args:
        interface ([`VisualTokenInterface`]): The model's interface (it draws, and computes the generation loss).
        perturber ([`Perturber`]): Switched off while drawing.
        args ([`UniGameArguments`]): The run's configuration (`generation_anchors`, guidance, temperature, seed).
        metrics ([`GameMetrics`]): Where the anchors' count goes.
    """

    def __init__(self, interface, perturber, args, metrics: GameMetrics):
        self.interface = interface
        self.perturber = perturber
        self.args = args
        self.metrics = metrics
        self.capacity = args.generation_anchors
        self.prompts: list[str] = []
        self.images: list[torch.Tensor] = []  # uint8, (3, H, W), on the CPU
        self._batches = 0  # batches taken in the current step (micro-batches of one accumulation window)
        self._step = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def full(self) -> bool:
        return len(self.prompts) >= self.capacity

    def new_prompts(self, rows: list[dict[str, Any]] | None) -> list[str]:
        """The prompts of `rows` to draw now: each row's, as many as there is room for (a prompt that comes again is
        drawn again: another sample of the same generator)."""
        if rows is None or self.full:
            return []
        return [row["prompt"] for row in rows][: self.capacity - len(self.prompts)]

    @torch.no_grad()
    def draw(self, model, prompts: list[str], step: int, process_index: int) -> None:
        """Draws one image per prompt with `model`'s adapter and the perturber off, and keeps them.

        Args:
            model: The unwrapped PEFT model (no DDP hooks: nothing here trains).
            prompts: The prompts to draw (from [`~GenerationAnchors.new_prompts`]); none draws nothing.
            step: The optimizer step (seeds the draw, with `process_index`).
            process_index: This process's index.
        """
        if not prompts:
            return
        args = self.args
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=self.interface.device)
        generator.manual_seed(mining_seed(args.seed + ANCHOR_SEED_OFFSET, step, process_index))
        try:
            with ExitStack() as stack:
                stack.enter_context(adapter_disabled(model))
                stack.enter_context(self.perturber.disabled())
                pixels = self.interface.generate_images(
                    prompts,
                    num_images=1,
                    guidance_scale=args.generation_guidance_scale,
                    temperature=args.generation_temperature,
                    generator=generator,
                )
        finally:
            model.train(was_training)
        for prompt, image in zip(prompts, pixels):
            self.prompts.append(prompt)
            self.images.append(to_uint8(image))
        self.metrics.add("unigame/generation_anchors", len(self.prompts))

    def batch(self, size: int, step: int, process_index: int) -> tuple[list[str], torch.Tensor]:
        """`size` anchors drawn uniformly without replacement (all of them when fewer are held), seeded by the step,
        this process and the micro-batch's place in the accumulation window: `(prompts, pixels in [0, 1])`.

        Raises:
            RuntimeError: when no anchor is held yet.
        """
        if not self.prompts:
            raise RuntimeError("No generation anchor has been drawn yet: `draw` runs before the first loss.")
        if step != self._step:
            self._step, self._batches = step, 0
        generator = torch.Generator()
        generator.manual_seed(mining_seed(self.args.seed + ANCHOR_SEED_OFFSET + self._batches, step, process_index))
        self._batches += 1
        order = torch.randperm(len(self.prompts), generator=generator)[:size].tolist()
        pixels = torch.stack([self.images[i] for i in order]).to(self.interface.device).float() / 255
        return [self.prompts[i] for i in order], pixels
