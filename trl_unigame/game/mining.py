"""Mining: generate candidates through the perturbed generation path, decode, score, select, push into the buffer;
and the check of the clean generator that mining relies on."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..buffer import HardSampleBuffer
from ..interfaces.base import to_uint8
from ..selection import hardness as hardness_score
from ..selection import select_hard_candidates
from .adversary import Adversary
from .generation_adversary import GenerationAdversary
from .metrics import GameMetrics


# Consecutive mining rounds that keep nothing before the trainer warns that the game has become plain fine-tuning.
EMPTY_MINING_ROUNDS_WARNING = 5


def mining_seed(seed: int, step: int, process_index: int) -> int:
    """The generator seed of the mining round at optimizer step `step`: one round per step, its own per process."""
    return seed + 1_000_003 * step + 7919 * process_index


def check_seed(seed: int, process_index: int) -> int:
    """The generator seed of the clean-generation check: the same at every check, so checks compare."""
    return seed + 15_485_863 + 7919 * process_index


def thumbnail(image: torch.Tensor, size: int = 96) -> torch.Tensor:
    """A small uint8 copy of a `[0, 1]` image `(3, H, W)`, kept beside a hard sample for display."""
    image = image.detach().float().unsqueeze(0)
    if max(image.shape[-2:]) > size:
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return to_uint8(image[0])


class Miner:
    """Mines decoded hard samples into the buffer and checks the clean generator.

    Rounds run once per optimizer step, on the last micro-batch of the accumulation window, every `mining_interval`
    steps (`generation_check_interval` for the check).

    Args:
        interface ([`VisualTokenInterface`]): The model's interface.
        adversary ([`Adversary`]): The perturber's player (its perturber acts on the generation path).
        buffer ([`HardSampleBuffer`]): Where kept candidates go.
        args ([`UniGameArguments`]): The run's configuration.
        metrics ([`GameMetrics`]): Where the rounds' metrics go.
        scorer (`Callable`, *optional*): `(images, texts) -> scores`, the consistency filter.
        interval (`int`): Optimizer steps between rounds (0: no mining).
        compile_config (`transformers.CompileConfig`, *optional*): Compiles the one-token step of the loop.
        generation_adversary ([`GenerationAdversary`], *optional*): Steps the perturber on each round's candidates.
    """

    def __init__(
        self,
        interface,
        adversary: Adversary,
        buffer: HardSampleBuffer,
        args,
        metrics: GameMetrics,
        scorer: Callable | None,
        interval: int,
        compile_config=None,
        generation_adversary: GenerationAdversary | None = None,
    ):
        self.interface = interface
        self.adversary = adversary
        self.perturber = adversary.perturber
        self.buffer = buffer
        self.args = args
        self.metrics = metrics
        self.scorer = scorer
        self.interval = interval
        self.check_interval = args.generation_check_interval if interface.can_generate and scorer is not None else 0
        self.compile_config = compile_config
        self.generation_adversary = generation_adversary
        self._empty_rounds = 0
        self._warned_empty = False

    def state_dict(self) -> dict[str, Any]:
        """The run of empty rounds so far (and whether it was warned about), for a checkpoint."""
        return {"empty_rounds": self._empty_rounds, "warned_empty": self._warned_empty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._empty_rounds = int(state["empty_rounds"])
        self._warned_empty = bool(state["warned_empty"])

    def due(self, step: int, last_micro_batch: bool) -> bool:
        return bool(self.interval) and last_micro_batch and step % self.interval == 0

    def check_due(self, step: int, last_micro_batch: bool) -> bool:
        return bool(self.check_interval) and last_micro_batch and step % self.check_interval == 0

    def _generate(
        self, prompts: list[str], num_images: int, seed: int, compiled: bool = True, return_tokens: bool = False
    ):
        generator = torch.Generator(device=self.interface.device)
        generator.manual_seed(seed)
        return self.interface.generate_images(
            prompts,
            num_images=num_images,
            guidance_scale=self.args.generation_guidance_scale,
            temperature=self.args.generation_temperature,
            generator=generator,
            image_size=self.args.mining_image_size,
            compile_config=self.compile_config if compiled else None,
            **({"return_tokens": True} if return_tokens else {}),
        )

    @torch.no_grad()
    def mine(
        self,
        model,
        rows: list[dict[str, Any]],
        inputs: dict[str, Any] | None,
        step: int,
        process_index: int,
        prepare_inputs: Callable[[dict], dict],
    ) -> None:
        """Generates `num_candidates` per row through the perturbed generation path, scores them and keeps the hardest.

        Args:
            model: The unwrapped model (no DDP hooks: nothing here trains).
            rows: The batch's rows (`question`, `answer`, `prompt`, ...).
            inputs: The batch's host inputs, for the source images shown beside the candidates.
            step: The optimizer step.
            process_index: This process's index (its own candidates).
            prepare_inputs: The host's `_prepare_inputs` (device placement).
        """
        args, interface = self.args, self.interface
        was_training = model.training
        model.eval()
        try:
            prompts = [r["prompt"] for r in rows]
            tokens = None
            with self.perturber.active(), self.perturber.measuring() as measured:
                seed = mining_seed(args.seed, step, process_index)
                if self.generation_adversary is not None:
                    pixels, tokens = self._generate(prompts, args.num_candidates, seed, return_tokens=True)
                else:
                    pixels = self._generate(prompts, args.num_candidates, seed)
            self.adversary.log_realized_perturbation(measured)
            source = torch.arange(len(rows)).repeat_interleave(args.num_candidates)
            consistency = None
            if self.scorer is not None:
                consistency = torch.as_tensor(self.scorer(pixels, [prompts[i] for i in source]), dtype=torch.float32)
                consistency = consistency.cpu()
            candidates = interface.build_understanding_inputs(
                pixels, [rows[i]["question"] for i in source], [rows[i]["answer"] for i in source]
            )
            with self.perturber.disabled():
                ce = interface.understanding_loss(model, prepare_inputs(candidates)).float().cpu()
            h = hardness_score(ce, consistency, args.consistency_weight, args.consistency_threshold)
            keep = select_hard_candidates(
                h,
                consistency,
                source,
                rule=args.selection,
                quantile=args.hardness_quantile,
                threshold=args.consistency_threshold,
                top_k=args.candidates_kept_per_sample,
            )
            sources = interface.source_images(inputs) if inputs is not None else None
            if sources is not None and len(sources) != len(rows):
                sources = None  # not one image per row: nothing to show beside the candidates
            entered = 0
            for i in keep.tolist():
                entered += self.buffer.push(
                    pixels[i],
                    rows[source[i]],
                    float(h[i]),
                    None if consistency is None else float(consistency[i]),
                    extra=None if sources is None else {"source": thumbnail(sources[source[i]])},
                    step=step,
                )
            if args.buffer_max_age is not None:
                self.buffer.evict_older_than(step - args.buffer_max_age)
            if self.generation_adversary is not None:
                # In eval mode, as it sampled: the teacher-forced pass sees the distribution the tokens came from.
                self.generation_adversary.step(prompts, tokens, h, consistency, step)
        finally:
            model.train(was_training)
        self.metrics.add("unigame/mined", len(source))
        self.metrics.add("unigame/kept_fraction", len(keep) / max(len(source), 1))
        self.metrics.add("unigame/buffer_entered", entered)
        if len(self.buffer):
            ages = [step - e.step for e in self.buffer.entries]
            self.metrics.add("unigame/buffer_mean_age", sum(ages) / len(ages))
        self.metrics.add("unigame/candidate_loss", float(ce.mean()))
        if consistency is not None:
            self.metrics.add("unigame/consistency", float(consistency.mean()))
            faithful = (consistency >= args.consistency_threshold).float()
            self.metrics.add("unigame/faithful_fraction", float(faithful.mean()))
            if bool(faithful.any()):
                self.metrics.add("unigame/faithful_hardness", float(h[faithful.bool()].mean()))
        if len(keep):
            self.metrics.add("unigame/kept_hardness", float(h[keep].mean()))
        self._note_empty_round(kept=len(keep), consistency=consistency, step=step)

    @torch.no_grad()
    def check_clean_generation(self, model, rows: list[dict[str, Any]], process_index: int) -> None:
        """Scores one generation per row with the perturber off: the quality of the generator mining relies on."""
        was_training = model.training
        model.eval()
        try:
            prompts = [r["prompt"] for r in rows]
            with self.perturber.disabled():
                # Eager: a rare check at another batch size would add a graph and a kept cache to mining's one.
                pixels = self._generate(prompts, 1, check_seed(self.args.seed, process_index), compiled=False)
            scores = torch.as_tensor(self.scorer(pixels, prompts), dtype=torch.float32)
        finally:
            model.train(was_training)
        self.metrics.add("unigame/clean_generation_consistency", float(scores.mean()))

    def _note_empty_round(self, kept: int, consistency: torch.Tensor | None, step: int) -> None:
        """Counts consecutive rounds that kept nothing, and warns once when the game has quietly become SFT."""
        self._empty_rounds = 0 if kept else self._empty_rounds + 1
        self.metrics.add("unigame/empty_mining_rounds", self._empty_rounds)
        if self._empty_rounds < EMPTY_MINING_ROUNDS_WARNING or self._warned_empty:
            return
        self._warned_empty = True
        args = self.args
        seen = "" if consistency is None else f" (consistency of the last round: mean {float(consistency.mean()):.3f})"
        warnings.warn(
            f"UniGame step {step}: the last {self._empty_rounds} mining rounds kept no candidate{seen}, so the buffer "
            f"gets nothing new and training is plain fine-tuning. With `selection='{args.selection}'`, a candidate "
            f"needs consistency >= `consistency_threshold` ({args.consistency_threshold}) and hardness >= the "
            f"`hardness_quantile` ({args.hardness_quantile}) quantile. Set `consistency_threshold` for the consistency "
            "scorer in use (see docs/train_janus.md), lower `hardness_quantile`, use `selection='reference'`, or pass "
            "a task-specific `consistency_scorer`."
        )
