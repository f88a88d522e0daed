"""UniGame: the two-player training step on top of `transformers.Trainer` (and, through the mixin, TRL trainers)."""

from __future__ import annotations

import copy
import os
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .buffer import HardSampleBuffer
from .consistency import load_consistency_scorer
from .data import ROWS_KEY, UniGameDataCollator, check_columns, check_rows
from .interfaces import VisualTokenInterface, get_interface, to_pil_images, unwrap_model
from .interfaces.base import to_uint8
from .perturber import Perturber
from .selection import hardness as hardness_score
from .selection import select_hard_candidates
from .unigame_config import UniGameArguments, UniGameConfig


PERTURBER_DIR = "perturber"
PERTURBER_OPTIMIZER_NAME = "perturber_optimizer.pt"
BUFFER_NAME = "unigame_buffer_rank{rank}.pt"
# Consecutive mining rounds that keep nothing before the trainer warns that the game has become plain fine-tuning.
EMPTY_MINING_ROUNDS_WARNING = 5
# Below this cosine between the perturbation that reached the model and the intended one, the trainer warns.
REALIZED_COSINE_WARNING = 0.9


@dataclass
class _BufferBatch:
    """A batch drawn from the buffer: its host inputs, the entries they came from and the weight of their loss (0 for
    a stand-in that only keeps this process's forwards in step with the others)."""

    inputs: dict[str, Any]
    entries: list = field(default_factory=list)
    weight: float = 0.0


class _SeparateBufferStep(TrainerCallback):
    """`understanding_update="separate"`: the buffer's optimizer step runs right after the clean one, as in the
    authors' code, once per optimizer step (outside the accumulation window, so every process takes it together)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._separate_buffer_step()


def _thumbnail(image: torch.Tensor, size: int = 96) -> torch.Tensor:
    """A small uint8 copy of a `[0, 1]` image `(3, H, W)`, kept beside a hard sample for display."""
    image = image.detach().float().unsqueeze(0)
    if max(image.shape[-2:]) > size:
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return to_uint8(image[0])


class UniGameMixin:
    r"""
    The UniGame game, stacked on a host `transformers.Trainer` subclass by overriding `training_step`,
    `compute_loss`, `log` and the checkpoint hooks. The host's own loss is the game's loss: the perturber ascends it
    with the perturbation active; the model descends it on clean data plus hard samples from the buffer.

    A host subclass sets `self.interface`, calls [`~UniGameMixin._init_game`] after `Trainer.__init__`, and
    implements `_describe_row` (row -> texts kept for mining) and `_hard_sample_row` (buffer entry -> host row).
    """

    _tag_names = ["trl", "unigame"]
    _paper = {"title": "UniGame: Turning a Unified Multimodal Model Into Its Own Adversary", "id": "2511.19413"}

    # ------------------------------------------------------------------------------------------------ set-up
    def _init_game(self, perturber: Perturber | None, consistency_scorer) -> None:
        args: UniGameArguments = self.args
        base = unwrap_model(self.model)
        if perturber is None:
            perturber = Perturber.for_model(
                base,
                width=args.perturber_width,
                depth=args.perturber_depth,
                eps_max=args.perturber_eps_max,
                eps_init=args.perturber_eps_init,
                sites=args.perturber_sites,
                budget=args.perturber_budget,
                site_budgets=generation_budget(args),
            )
        # float32 regardless of the model dtype: its output is a norm-0.02 direction that bf16 would round away.
        self.perturber = perturber.to(device=self.args.device, dtype=torch.float32).attach(base)
        self.perturber.requires_grad_(True)
        # Off outside the game's own passes: `trainer.model` stays the clean model for evaluation and inference.
        self.perturber.enabled = False
        self.perturber_optimizer = torch.optim.AdamW(
            self.perturber.parameters(), lr=args.perturber_learning_rate, weight_decay=args.perturber_weight_decay
        )
        self.buffer = HardSampleBuffer(
            capacity=args.buffer_capacity,
            temperature=args.buffer_temperature,
            pop=args.buffer_pop,
            seed=args.seed + self.args.process_index,
        )
        # Mining decodes generated images: a model that cannot generate plays the game in embedding space only.
        self.mining_interval = args.mining_interval if self.interface.can_generate else 0
        if not self.interface.can_generate:
            _warn_embedding_only_game(args, type(base).__name__)
        if self.mining_interval and args.mining_image_size is not None:
            self.interface.generation_grid(args.mining_image_size)  # a size the generator cannot make fails here
        # One config object for the run: the interface keeps the compiled step per config, so mining compiles once.
        self._mining_compile_config = args.mining_compile_config() if self.interface.can_generate else None
        self.consistency_scorer = load_consistency_scorer(
            args, consistency_scorer, can_mine=bool(self.mining_interval)
        )
        self._game_metrics: dict[str, list[float]] = defaultdict(list)
        self._buffer_batch: _BufferBatch | None = None
        self._stand_in_inputs = None
        self._clean_rows = None
        self._perturber_window_finite = True
        self._empty_mining_rounds = 0
        self._warned_empty_mining = False
        self._warned_precision: set[str] = set()
        self.current_gradient_accumulation_steps = getattr(self, "current_gradient_accumulation_steps", 1)
        from .callbacks import HardSamplePicturesCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, HardSamplePicturesCallback):
                callback.trainer = self  # it draws from the buffer and asks the model for predictions
        if args.understanding_update == "separate":
            self.add_callback(_SeparateBufferStep(self))
        if (
            args.generation_loss_weight
            and type(self.interface).generation_loss is VisualTokenInterface.generation_loss
        ):
            raise ValueError(
                f"`generation_loss_weight` needs the model's image-generation loss, which {type(self.interface).__name__}"
                " does not provide: set `generation_loss_weight=0`."
            )

    def _describe_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _hard_sample_row(self, row: dict[str, Any], image) -> dict[str, Any]:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------- the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch of the game: perturber ascent, mining, understanding descent (clean + buffer)."""
        rows = inputs.pop(ROWS_KEY, None)
        if rows is None and self.mining_interval:
            raise ValueError(
                f"The batch has no {ROWS_KEY!r}: mining needs each row's question and answer. Wrap a custom collator "
                "in `trl_unigame.data.RowKeepingCollator`, or use the trainer's default collator."
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._clean_rows = rows
        first_order = bool(self.args.adversarial_weight) and self.args.perturber_update == "first_order"
        if self.args.adversarial_weight and not first_order:
            self._perturber_step(model, inputs)
        step = self.state.global_step
        if rows is not None and self.mining_interval and step % self.mining_interval == 0:
            self._mine(model, rows, inputs)
        check = self.args.generation_check_interval if self.interface.can_generate else 0
        if rows is not None and check and step % check == 0 and self.consistency_scorer is not None:
            self._check_clean_generation(model, rows)
        if self.args.understanding_update == "mixed":
            self._buffer_batch = self._draw_buffer_batch(stand_in=inputs)
        else:
            self._stand_in_inputs = inputs  # for the buffer step after the optimizer step, see `_SeparateBufferStep`
        try:
            with (
                self.perturber.disabled(),
                self._visual_token_gradient() if first_order else nullcontext([]) as tokens,
            ):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._buffer_batch = self._clean_rows = None
        if first_order:
            self._first_order_perturber_step(tokens)
        if self.accelerator.sync_gradients:
            self._drop_non_finite_update(model)
        return loss

    def _perturber_step(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Ascent of the perturber on the host loss (`perturber_update="exact"`): a forward and backward with the
        perturbation active; only the perturber's gradients are computed."""
        unwrapped = self.accelerator.unwrap_model(model)  # no DDP hooks: the model's weights get no gradient here
        with (
            self.perturber.active(),
            self.perturber.recording() as deltas,
            self.perturber.measuring() as measured,
            self.compute_loss_context_manager(),
            self._host_metrics_paused(),
        ):
            adversarial_loss = self._host_loss(unwrapped, inputs)
        self._log_realized_perturbation(measured)
        if self._ascend(adversarial_loss / self.current_gradient_accumulation_steps, deltas):
            self._game_metrics["unigame/adversarial_loss"].append(float(adversarial_loss.detach()))
        if self.accelerator.sync_gradients:
            self._perturber_optimizer_step()

    @contextmanager
    def _visual_token_gradient(self):
        """Keeps the first visual tokens the understanding site produces inside the context (the clean batch's),
        so that the clean backward leaves their gradient in `.grad` (`perturber_update="first_order"`)."""
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            if captured or not isinstance(output, torch.Tensor):
                return None
            if output.requires_grad:
                output.retain_grad()
                captured.append(output)
                return None
            leaf = output.detach().requires_grad_(True)  # the site is frozen: a leaf changes nothing upstream
            captured.append(leaf)
            return leaf

        handle = self.interface.understanding_site.register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()

    def _first_order_perturber_step(self, captured: list[torch.Tensor]) -> None:
        """Ascent of the perturber on the first-order change of the clean loss, `<g, delta(z)>`, with `g` the gradient
        at the visual tokens `z` that the clean backward has just computed: no extra pass through the model."""
        gradient = captured[0].grad if captured else None
        if gradient is None:
            self._perturber_window_finite = False
            self._skip("perturber", "the clean backward left no gradient at the visual tokens")
        else:
            tokens = captured[0].detach()
            with self.perturber.recording() as deltas:
                delta = self.perturber.delta(tokens, "understanding")
            # The clean loss was already divided by the accumulation window, so `gradient` is too.
            gain = (gradient.detach().float().to(delta.device) * delta).sum()
            if self._ascend(gain, deltas):
                self._game_metrics["unigame/adversarial_gain_estimate"].append(
                    float(gain.detach()) * self.current_gradient_accumulation_steps
                )
        if self.accelerator.sync_gradients:
            self._perturber_optimizer_step()

    def _ascend(self, adversarial: torch.Tensor, deltas: list[torch.Tensor]) -> bool:
        """Accumulates the perturber's gradient of `-lambda * adversarial + regularisers` (`adversarial` already
        divided by the accumulation window); returns `False` (and marks the window) when it is not finite."""
        args = self.args
        params = list(self.perturber.parameters())
        penalty = torch.zeros((), device=self.perturber.rho.device)
        if deltas:
            if args.delta_reg_weight:
                penalty = (
                    penalty + args.delta_reg_weight * torch.stack([d.pow(2).sum(-1).mean() for d in deltas]).mean()
                )
            if args.tv_reg_weight:
                tv = [
                    (d[..., 1:, :] - d[..., :-1, :]).pow(2).sum(-1).mean()
                    for d in deltas
                    if d.dim() >= 3 and d.shape[-2] > 1
                ]
                if tv:
                    penalty = penalty + args.tv_reg_weight * torch.stack(tv).mean()
            self._game_metrics["unigame/delta_norm"].append(
                float(torch.cat([d.detach().norm(dim=-1).flatten() for d in deltas]).mean())
            )
        if args.eps_reg_weight:
            penalty = penalty + args.eps_reg_weight * self.perturber.eps_tensor.pow(2)
        objective = -args.adversarial_weight * adversarial + penalty / self.current_gradient_accumulation_steps
        if not torch.isfinite(objective):
            self._perturber_window_finite = False
            self._skip("perturber", "the perturber's loss is not finite")
            return False
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        return True

    def _perturber_optimizer_step(self) -> None:
        """Steps the perturber once per accumulation window, or leaves it and its optimizer exactly as they are when
        any micro-batch of the window, on any process, had a non-finite loss or gradient."""
        params = list(self.perturber.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # The window's finiteness travels with the gradients, so every process takes the same decision.
        finite = torch.tensor([float(self._perturber_window_finite)], device=grads[0].device, dtype=grads[0].dtype)
        flat = torch.cat([g.flatten() for g in grads] + [finite])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum") / self.accelerator.num_processes
        self._perturber_window_finite = True
        if bool(flat[-1] == 1) and bool(torch.isfinite(flat).all()):
            for p, g in zip(params, torch.split(flat[:-1], [g.numel() for g in grads])):
                p.grad = g.view_as(p)
            self.perturber_optimizer.step()
        self.perturber_optimizer.zero_grad(set_to_none=True)
        self._game_metrics["unigame/eps"].append(self.perturber.eps)

    @torch.no_grad()
    def _mine(self, model: nn.Module, rows: list[dict[str, Any]], inputs: dict[str, Any] | None = None) -> None:
        """Generates K candidates per sample through the perturbed generation path, scores and keeps the hardest."""
        args = self.args
        interface = self.interface
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            generator = torch.Generator(device=interface.device)
            generator.manual_seed(args.seed + 1_000_003 * self.state.global_step + 7919 * args.process_index)
            prompts = [r["prompt"] for r in rows]
            with self.perturber.active(), self.perturber.measuring() as measured:
                pixels = interface.generate_images(
                    prompts,
                    num_images=args.num_candidates,
                    guidance_scale=args.generation_guidance_scale,
                    temperature=args.generation_temperature,
                    generator=generator,
                    image_size=args.mining_image_size,
                    compile_config=self._mining_compile_config,
                )
            self._log_realized_perturbation(measured)
            source = torch.arange(len(rows)).repeat_interleave(args.num_candidates)
            consistency = None
            if self.consistency_scorer is not None:
                consistency = torch.as_tensor(
                    self.consistency_scorer(pixels, [prompts[i] for i in source]), dtype=torch.float32
                ).cpu()
            candidate_inputs = interface.build_understanding_inputs(
                pixels, [rows[i]["question"] for i in source], [rows[i]["answer"] for i in source]
            )
            candidate_inputs = self._prepare_inputs(candidate_inputs)
            with self.perturber.disabled():
                ce = interface.understanding_loss(unwrapped, candidate_inputs).float().cpu()
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
            sources = self.interface.source_images(inputs) if inputs is not None else None
            if sources is not None and len(sources) != len(rows):
                sources = None  # not one image per row: nothing to show beside the candidates
            step = self.state.global_step
            entered = 0
            for i in keep.tolist():
                entered += self.buffer.push(
                    pixels[i],
                    rows[source[i]],
                    float(h[i]),
                    None if consistency is None else float(consistency[i]),
                    extra=None if sources is None else {"source": _thumbnail(sources[source[i]])},
                    step=step,
                )
            if args.buffer_max_age is not None:
                self.buffer.evict_older_than(step - args.buffer_max_age)
        finally:
            unwrapped.train(was_training)
        self._game_metrics["unigame/mined"].append(float(len(source)))
        self._game_metrics["unigame/kept_fraction"].append(len(keep) / max(len(source), 1))
        self._game_metrics["unigame/buffer_entered"].append(float(entered))
        if len(self.buffer):
            ages = [self.state.global_step - e.step for e in self.buffer.entries]
            self._game_metrics["unigame/buffer_mean_age"].append(sum(ages) / len(ages))
        self._game_metrics["unigame/candidate_loss"].append(float(ce.mean()))
        if consistency is not None:
            self._game_metrics["unigame/consistency"].append(float(consistency.mean()))
        self._note_empty_mining(kept=len(keep), consistency=consistency)

    @torch.no_grad()
    def _check_clean_generation(self, model: nn.Module, rows: list[dict[str, Any]]) -> None:
        """Scores one generation per sample with the perturber off: the quality of the generator mining relies on."""
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            generator = torch.Generator(device=self.interface.device)
            generator.manual_seed(self.args.seed + 15_485_863 + 7919 * self.args.process_index)  # the same each time
            prompts = [r["prompt"] for r in rows]
            with self.perturber.disabled():
                pixels = self.interface.generate_images(
                    prompts,
                    num_images=1,
                    guidance_scale=self.args.generation_guidance_scale,
                    temperature=self.args.generation_temperature,
                    generator=generator,
                    image_size=self.args.mining_image_size,
                    compile_config=self._mining_compile_config,
                )
            scores = torch.as_tensor(self.consistency_scorer(pixels, prompts), dtype=torch.float32)
        finally:
            unwrapped.train(was_training)
        self._game_metrics["unigame/clean_generation_consistency"].append(float(scores.mean()))

    def _log_realized_perturbation(self, measured: dict[str, dict[str, float]]) -> None:
        """Logs what reached the model at each site after the cast to its dtype, and warns once when rounding has
        turned the perturbation into something else (cosine to the intended one below `REALIZED_COSINE_WARNING`)."""
        for site, values in measured.items():
            prefix = "unigame/" if site == "understanding" else f"unigame/{site}_"
            for key in ("realized_delta_norm", "realized_delta_cosine", "token_norm"):
                self._game_metrics[prefix + key].append(values[key])
            if values["realized_delta_cosine"] < REALIZED_COSINE_WARNING and site not in self._warned_precision:
                self._warned_precision.add(site)
                warnings.warn(
                    f"UniGame: at the {site} site only part of the perturbation reaches the model: after the cast to "
                    f"{values['dtype']} its norm is {values['realized_delta_norm']:.3g} (intended "
                    f"{values['intended_delta_norm']:.3g}) and its cosine to the intended direction "
                    f"{values['realized_delta_cosine']:.2f}, on tokens of median norm {values['token_norm']:.3g}. The "
                    "rest is rounding noise, and the perturber's gradient points where the forward pass never went. "
                    "Use a budget relative to the token norm (`perturber_budget='relative'`, e.g. "
                    "`perturber_eps_max=0.05`), or a larger absolute budget."
                )

    def _note_empty_mining(self, kept: int, consistency: torch.Tensor | None) -> None:
        """Counts consecutive mining rounds that kept nothing, and warns once when the game has quietly become SFT."""
        self._empty_mining_rounds = 0 if kept else self._empty_mining_rounds + 1
        self._game_metrics["unigame/empty_mining_rounds"].append(float(self._empty_mining_rounds))
        if self._empty_mining_rounds < EMPTY_MINING_ROUNDS_WARNING or self._warned_empty_mining:
            return
        self._warned_empty_mining = True
        args = self.args
        seen = "" if consistency is None else f" (consistency of the last round: mean {float(consistency.mean()):.3f})"
        warnings.warn(
            f"UniGame step {self.state.global_step}: the last {self._empty_mining_rounds} mining rounds kept no "
            f"candidate{seen}, so the buffer gets nothing new and training is plain fine-tuning. With "
            f"`selection='{args.selection}'`, a candidate needs consistency >= `consistency_threshold` "
            f"({args.consistency_threshold}) and hardness >= the `hardness_quantile` ({args.hardness_quantile}) "
            "quantile. Set `consistency_threshold` for the consistency scorer in use (see docs/train_janus.md), "
            "lower `hardness_quantile`, use `selection='reference'`, or pass a task-specific `consistency_scorer`."
        )

    def _draw_buffer_batch(self, stand_in: dict[str, Any] | None) -> _BufferBatch | None:
        """The buffer batch of this step, or `None` when no process has one.

        Processes must run the same forwards (DDP synchronises buffers in each, TRL hosts gather metrics), so
        when any process has hard samples, a process whose buffer is empty runs the buffer pass on `stand_in`
        (its clean batch) with weight 0.
        """
        if self.args.buffer_weight == 0:
            return None
        entries = self.buffer.sample(self.args.buffer_batch_size)
        if not self._on_any_process(bool(entries)):
            return None
        if not entries:
            return _BufferBatch(inputs=stand_in, entries=[], weight=0.0)
        host_rows = [self._hard_sample_row(e.row, to_pil_images(e.image.unsqueeze(0))[0]) for e in entries]
        batch = self.data_collator(host_rows)
        batch.pop(ROWS_KEY, None)
        return _BufferBatch(inputs=self._prepare_inputs(batch), entries=entries, weight=self.args.buffer_weight)

    def _on_any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        votes = torch.tensor([float(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def _buffer_loss(self, model: nn.Module, batch: _BufferBatch) -> torch.Tensor:
        """Host loss on a buffer batch; each drawn entry's hardness is refreshed from its own loss, at no extra cost."""
        with self._host_metrics_paused():
            loss, per_sample = self._host_loss_per_sample(model, batch.inputs)
        self._note_buffer_loss(batch, loss, per_sample)
        return loss

    def _note_buffer_loss(self, batch: _BufferBatch, loss: torch.Tensor, per_sample: torch.Tensor | None) -> None:
        """Logs the buffer loss and rescores the drawn entries from their own per-sample losses."""
        if not batch.entries:
            return
        self._game_metrics["unigame/buffer_loss"].append(float(loss.detach()))
        if per_sample is not None and len(per_sample) == len(batch.entries):
            args = self.args
            consistency = [e.consistency for e in batch.entries]
            s = None if any(c is None for c in consistency) else torch.tensor(consistency)
            h = hardness_score(
                per_sample.detach().float().cpu(), s, args.consistency_weight, args.consistency_threshold
            )
            self.buffer.rescore(batch.entries, h.tolist())

    def _one_pass_enabled(self) -> bool:
        """Whether this host can run the clean and buffer rows in one forward (`one_pass_update`)."""
        return False

    def _one_pass_inputs(self, inputs: dict[str, Any], batch: _BufferBatch) -> dict[str, Any] | None:
        """The clean and buffer rows as one batch for a single forward and backward, or `None` when they cannot share
        one (then every process runs two passes)."""
        return None

    def _separate_buffer_step(self) -> None:
        """The authors' variant: after the optimizer step on the clean batch, one more step on a buffer batch alone."""
        model = self.model_wrapped
        batch = self._draw_buffer_batch(stand_in=self._stand_in_inputs)
        self._stand_in_inputs = None
        if batch is None:
            return
        model.zero_grad()  # the clean step has used its gradients
        with self.perturber.disabled(), self.compute_loss_context_manager():
            loss = batch.weight * self._buffer_loss(model, batch)
        # Backward even when the loss is not finite: it is a collective under DDP; the update is dropped after it.
        self.accelerator.backward(loss)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self._drop_non_finite_update(model)
        self.optimizer.step()
        model.zero_grad()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Host loss on the clean batch, plus `buffer_weight` times the host loss on the buffer batch (mixed update).

        With `return_outputs=True`, the host's own outputs of the clean pass come back beside the loss."""
        inputs.pop(ROWS_KEY, None)
        batch = self._buffer_batch if model.training else None
        merged = None
        if batch is not None and not return_outputs and self._one_pass_enabled():
            merged = self._one_pass_inputs(inputs, batch) if batch.entries else None
            # Every process must run as many forwards (DDP syncs buffers in each): all take one pass unless any
            # process holds a buffer batch that cannot share its clean batch's forward.
            if self._on_any_process(bool(batch.entries) and merged is None):
                merged = None
            elif not batch.entries:
                batch = None  # a stand-in adds no forward of its own in one pass
        if merged is not None:
            # One forward and backward over clean + buffer rows; each part keeps its own mean, as in two passes.
            n = len(inputs["input_ids"])
            per_sample = self._host_loss_per_sample(model, merged)[1]
            clean, buffer_loss, outputs = per_sample[:n].mean(), per_sample[n:].mean(), None
            self._note_buffer_loss(batch, buffer_loss, per_sample[n:])
        else:
            result = self._host_loss(
                model, inputs, num_items_in_batch=num_items_in_batch, return_outputs=return_outputs
            )
            clean, outputs = result if return_outputs else (result, None)
            buffer_loss = self._buffer_loss(model, batch) if batch is not None else None
        loss = clean
        if model.training:
            self._game_metrics["unigame/clean_loss"].append(float(clean.detach()))
            if batch is not None:
                weight = batch.weight
                if num_items_in_batch is not None and getattr(self, "model_accepts_loss_kwargs", False):
                    # The host already normalised the clean loss over the whole accumulation window, so the
                    # Trainer will not divide by the window; the buffer's batch mean must be divided here.
                    weight = weight / self.current_gradient_accumulation_steps
                cap = self.args.buffer_max_loss_ratio
                if cap is not None and batch.entries:
                    # The buffer's weight follows the clean loss (a constant for this step: no gradient through it).
                    weight = min(weight, cap * float(clean.detach()) / max(float(buffer_loss.detach()), 1e-12))
                    self._game_metrics["unigame/buffer_weight"].append(weight)
                loss = loss + weight * buffer_loss
                if batch.entries:
                    share = float(weight * buffer_loss.detach()) / max(float(loss.detach()), 1e-12)
                    self._game_metrics["unigame/buffer_loss_share"].append(share)
            if self.args.perturbed_weight:
                loss = loss + self.args.perturbed_weight * self._perturbed_loss(model, inputs, num_items_in_batch)
            if self.args.generation_loss_weight and self._clean_rows is not None:
                loss = loss + self.args.generation_loss_weight * self._generation_loss(inputs)
            self._game_metrics["unigame/buffer_size"].append(float(len(self.buffer)))
        return (loss, outputs) if return_outputs else loss

    def _generation_loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The model's image-generation loss on the clean batch's (prompt, image) pairs (`generation_loss_weight`)."""
        images = self.interface.source_images(inputs)
        prompts = [r["prompt"] for r in self._clean_rows]
        if images is None or len(images) != len(prompts):
            raise ValueError(
                "`generation_loss_weight` needs one image per row that the interface can recover from the batch "
                f"({type(self.interface).__name__}.source_images); set `generation_loss_weight=0` for this data."
            )
        with self.perturber.disabled():
            loss = self.interface.generation_loss(self.model, prompts, images).mean()
        self._game_metrics["unigame/generation_loss"].append(float(loss.detach()))
        return loss

    def _perturbed_loss(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """U's loss on the batch with the perturber's current perturbation active: the embedding-space adversarial
        samples. The perturbation is a fixed input here: U's gradient does not reach the perturber."""
        frozen = [p for p in self.perturber.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with self.perturber.active(), self._host_metrics_paused():
                loss = self._host_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        self._game_metrics["unigame/perturbed_loss"].append(float(loss.detach()))
        return loss

    def _host_loss(self, model, inputs, num_items_in_batch=None, return_outputs=False):
        """The host trainer's loss (a scalar), with the host's outputs when `return_outputs`."""
        return super().compute_loss(
            model, dict(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _host_loss_per_sample(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The host loss and, where the host can tell, each sample's own loss (`None` otherwise)."""
        return self._host_loss(model, inputs), None

    @contextmanager
    def _host_metrics_paused(self):
        """The host's own metrics (TRL's token accuracy, token count, rewards) describe the clean pass only: what the
        perturbed and buffer passes add to them is dropped. Their collectives still run, on every process alike."""
        metrics = getattr(self, "_metrics", None)
        saved = copy.deepcopy(metrics) if metrics is not None else None
        tokens = getattr(self, "_total_train_tokens", None)
        try:
            yield
        finally:
            if saved is not None:
                metrics.clear()
                metrics.update(saved)
            if tokens is not None:
                self._total_train_tokens = tokens

    # ------------------------------------------------------------------------------------------- faults
    def _skip(self, player: str, why: str) -> None:
        warnings.warn(f"UniGame step {self.state.global_step}: {why}; the {player} update of this step is skipped.")
        self._game_metrics[f"unigame/skipped_{player}_steps"].append(1.0)

    def _drop_non_finite_update(self, model: nn.Module) -> None:
        """After the (all-reduced) backward of a step: if any gradient is not finite, the step leaves weights as
        they are (`None` gradients are skipped by the optimizer, weight decay included)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if params and not all(torch.isfinite(p.grad).all() for p in params):
            for p in params:
                p.grad = None
            self._skip("understanding", "the understanding loss or its gradient is not finite")

    # ------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs only; evaluation and the final summary pass through
            metrics = {k: sum(v) / len(v) for k, v in self._game_metrics.items() if v}
            for key in ("unigame/skipped_perturber_steps", "unigame/skipped_understanding_steps"):
                metrics[key] = float(sum(self._game_metrics.get(key, [])))
            logs = {**logs, **metrics}
            self._game_metrics.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The host's evaluation (the clean loss); with `args.predict_with_generate`, also the VQA accuracy of greedy
        answers, and under a PGD attack of budget `args.eval_attack_eps`, from [`UniGameEvaluator`] with the
        perturber off, merged as `{metric_key_prefix}_clean/vqa_accuracy`, ... and logged."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):  # one split of a dict of evaluation sets, named by the host's loop
            dataset = self.eval_dataset[dataset]
        if not getattr(self.args, "predict_with_generate", False) or dataset is None or isinstance(dataset, dict):
            return metrics  # a dict was evaluated split by split through this method already
        from .evaluation import UniGameEvaluator

        eps = self.args.eval_attack_eps
        evaluator = UniGameEvaluator(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            interface=self.interface,
            batch_size=self.args.per_device_eval_batch_size,
            attack_eps=[eps] if eps else None,
            attack_budget=self.args.perturber_budget,  # eval_attack_eps reads like perturber_eps_max
            seed=self.args.seed,
            show_progress=not self.args.disable_tqdm,
        )
        with self.perturber.disabled():
            generated = evaluator.evaluate(dataset)
        generated = {f"{metric_key_prefix}_{name}": value for name, value in generated.items()}
        self.log(generated)
        metrics.update(generated)
        return metrics

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        self.perturber.save_pretrained(os.path.join(output_dir, PERTURBER_DIR))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Runs inside `_save_checkpoint` before `trainer_state.json` is written: a checkpoint that has its trainer
        # state has the game's state too, whenever the process is killed.
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if self.args.should_save:
            _atomic_save(self.perturber_optimizer.state_dict(), os.path.join(output_dir, PERTURBER_OPTIMIZER_NAME))
        _atomic_save(
            self.buffer.state_dict(), os.path.join(output_dir, BUFFER_NAME.format(rank=self.args.process_index))
        )
        self.accelerator.wait_for_everyone()  # every process's buffer is on disk before rank 0 writes the state

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        from safetensors.torch import load_file

        weights = os.path.join(checkpoint, PERTURBER_DIR, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"{checkpoint} has no {PERTURBER_DIR}/model.safetensors: it was not written by a UniGame trainer, "
                "so the perturber cannot be resumed. Start a new run or pick a UniGame checkpoint."
            )
        optimizer_file = os.path.join(checkpoint, PERTURBER_OPTIMIZER_NAME)
        buffer_file = os.path.join(checkpoint, BUFFER_NAME.format(rank=self.args.process_index))
        missing = [os.path.basename(f) for f in (optimizer_file, buffer_file) if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"{checkpoint} lacks the game's state ({', '.join(missing)}), so resuming from it would not continue "
                "the same run: the checkpoint was cut short while being written, or was written by a different number "
                "of processes. Resume from an earlier checkpoint, with as many processes as wrote it."
            )
        self.perturber.load_state_dict(load_file(weights))  # copied onto the perturber's device in place
        self.perturber_optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu"))
        self.buffer.load_state_dict(torch.load(buffer_file, weights_only=False))


def _warn_embedding_only_game(args, model_name: str) -> None:
    """Says, once at start-up, what the game is on a model that cannot generate images (see docs/models.md)."""
    message = (
        f"{model_name} cannot generate images, so UniGame plays only its embedding-space game: mining is off (decoded "
        "hard samples need a unified model such as Janus-Pro or Emu3) and the perturber acts on the visual tokens of "
        "the understanding path. The paper found this embedding-only variant alone below plain fine-tuning (VQAv2 "
        "78.9 vs 79.5 for SFT; 83.4 for full UniGame)."
    )
    if not args.perturbed_weight:
        message += (
            " With `perturbed_weight=0` the model trains on the clean data plus nothing (the perturber's pass only "
            "costs time): set `perturbed_weight=0.5` to also train on the perturbed batch."
        )
    warnings.warn(message, stacklevel=3)


def _atomic_save(obj, path: str) -> None:
    """`torch.save` to a temporary file renamed into place: a killed process never leaves a truncated file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class UniGameTrainer(UniGameMixin, Trainer):
    r"""
    Trainer for UniGame self-adversarial post-training of a unified multimodal model.

    Each step plays the game of the paper: (1) the perturber ascends the understanding loss with its perturbation
    active at the shared visual-token interface, (2) every `mining_interval` steps, candidate images are generated
    through the perturbed generation path, decoded, scored and the hardest pushed into the hard-sample buffer,
    (3) the model descends the loss on the clean batch plus `buffer_weight` times the loss on buffer samples.

    Args:
        model (`transformers.PreTrainedModel` or `str`):
            A supported unified model (see [`get_interface`]) or its name/path, loaded with `from_pretrained`.
        args ([`UniGameConfig`], *optional*):
            Configuration; a default one with `output_dir="unigame-output"` when `None`.
        data_collator (`Callable`, *optional*):
            Defaults to [`UniGameDataCollator`], which expects columns `image`, `question`, `answer` (and optionally
            the `prompt_column`, e.g. `caption`).
        train_dataset (`datasets.Dataset`):
            Rows with `image` (PIL), `question` and `answer`.
        eval_dataset (`datasets.Dataset`, *optional*):
            Same format; evaluated with the clean understanding loss.
        processing_class (`transformers.ProcessorMixin`):
            The model's processor; loaded from `model`'s path when `None`.
        perturber ([`Perturber`], *optional*):
            A perturber to continue training; a fresh one sized for the model when `None`.
        peft_config (`peft.PeftConfig`, *optional*):
            LoRA configuration; when its `target_modules` is `None` the LLM's projections are adapted (never the
            vision tower or the generation stack).
        consistency_scorer (`Callable`, *optional*):
            `(images, texts) -> scores`; defaults to a [`CLIPConsistencyScorer`] from `args.consistency_model`
            (`None` there disables the consistency filter).
        callbacks, optimizers, compute_metrics, preprocess_logits_for_metrics:
            As in `transformers.Trainer`.
    """

    _name = "UniGame"

    def __init__(
        self,
        model,
        args: UniGameConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        perturber: Perturber | None = None,
        peft_config=None,
        consistency_scorer=None,
        callbacks=None,
        optimizers=(None, None),
        compute_metrics=None,
        preprocess_logits_for_metrics=None,
    ):
        if args is None:
            args = UniGameConfig(output_dir="unigame-output")
        if not isinstance(args, UniGameArguments):
            raise TypeError(f"`args` must be a UniGameConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            from transformers import AutoModelForImageTextToText, AutoProcessor

            if processing_class is None:
                processing_class = AutoProcessor.from_pretrained(model)
            model = AutoModelForImageTextToText.from_pretrained(model)
        if processing_class is None:
            raise ValueError("Pass the model's processor as `processing_class`.")
        self.interface = get_interface(model, processing_class)
        if train_dataset is None:
            raise ValueError("UniGameTrainer needs a `train_dataset` with columns image, question and answer.")
        hint = (
            "Rename the columns (e.g. `dataset.rename_column('img', 'image')`), or map VQAv2 and conversational "
            "datasets with `trl_unigame.data.to_vqa_format`, before training."
        )
        check_columns(train_dataset, ["image", "question", "answer"], "train_dataset", hint)
        check_columns(eval_dataset, ["image", "question", "answer"], "eval_dataset", hint)
        check_rows(train_dataset, "train_dataset")
        check_rows(eval_dataset, "eval_dataset")
        consistency_scorer = load_consistency_scorer(args, consistency_scorer, can_mine=self.interface.can_generate)
        _seed(args)  # the LoRA weights are drawn here, before `Trainer.__init__` seeds: a run repeats exactly
        model = prepare_understanding_player(model, self.interface, peft_config)
        self.interface = get_interface(model, processing_class)
        if data_collator is None:
            data_collator = UniGameDataCollator(self.interface, prompt_column=args.prompt_column)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a mean over samples, scaled for accumulation here
        self._init_game(perturber, consistency_scorer)

    def _describe_row(self, row):
        return row

    def _hard_sample_row(self, row, image):
        return {"image": image, "question": row["question"], "answer": row["answer"], "prompt": row["prompt"]}

    def _host_loss(self, model, inputs, num_items_in_batch=None, return_outputs=False):
        loss = self.interface.understanding_loss(model, inputs).mean()
        return (loss, {"loss": loss}) if return_outputs else loss

    def _host_loss_per_sample(self, model, inputs):
        per_sample = self.interface.understanding_loss(model, inputs)
        return per_sample.mean(), per_sample

    def _one_pass_enabled(self):
        return self.args.one_pass_update

    def _one_pass_inputs(self, inputs, batch):
        return self.interface.concatenate_inputs(inputs, batch.inputs)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        """Writes `README.md` in the output directory: base model, dataset, tags (`trl`, `unigame`), the game's
        configuration and the paper's citation."""
        if not self.is_world_process_zero():
            return
        from dataclasses import fields

        from .model_card import unigame_model_card

        base = unwrap_model(self.model)
        base_model = getattr(base.config, "_name_or_path", None) or None
        if base_model and os.path.isdir(base_model):
            base_model = None  # a local path means nothing on the Hub
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        game = {f.name: getattr(self.args, f.name) for f in fields(UniGameArguments)}
        card = unigame_model_card(
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            base_model=base_model,
            dataset_name=dataset_name or kwargs.get("dataset"),
            tags=tags + list(self._tag_names),
            unigame_config=game,
            trainer_name=type(self).__name__,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(ROWS_KEY, None)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.perturber.disabled():
            loss = self._host_loss(model, inputs).detach()
        return loss, None, None


def _seed(args) -> None:
    """Seeds every RNG from `args.seed` (fully deterministic with `args.full_determinism`), as `Trainer` does."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)


def generation_budget(args: UniGameArguments) -> dict | None:
    """The perturber's `site_budgets` for the config's generation-site fields (`None` when they add nothing)."""
    override = {}
    if args.perturber_generation_budget is not None:
        override["budget"] = args.perturber_generation_budget
    if args.perturber_generation_eps_max is not None:
        override["eps_max"] = args.perturber_generation_eps_max
    return {"generation": override} if override else None


def prepare_understanding_player(model, interface, peft_config=None):
    """Makes the understanding player trainable and nothing else.

    With a `peft_config`, LoRA goes on the LLM only (the interface's `lora_target_modules` when the config names
    none). Without one, a model that already carries PEFT adapters keeps them as they are; a plain model trains its
    LLM, and the vision tower and generation stack stay frozen.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if peft_config is not None:
        if isinstance(model, PeftModel):
            raise ValueError(
                "The model already has a PEFT adapter and a `peft_config` was given: pass one or the other "
                "(to continue an adapter, load it with `PeftModel.from_pretrained(model, path, is_trainable=True)`)."
            )
        if getattr(peft_config, "target_modules", None) is None:
            peft_config.target_modules = interface.lora_target_modules
        base = unwrap_model(model)
        if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.requires_grad_(False)
        model = get_peft_model(model, peft_config)
    elif not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            param.requires_grad_(interface.is_understanding_parameter(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("The understanding player has no trainable parameter: check `peft_config` or the adapter.")
    return model
