"""UniGame: the two-player training step on top of `transformers.Trainer` (and, through the mixin, TRL trainers).

The mixin orchestrates; the game's parts live in `trl_unigame.game`: the adversary's step (`adversary`), mining
(`mining`), the buffer pass (`buffer_pass`), the composition of U's loss (`loss`), agreement between processes
(`agreement`), checkpoint files (`checkpoint`) and metrics (`metrics`).
"""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .buffer import HardSampleBuffer
from .consistency import load_consistency_scorer
from .data import ROWS_KEY, UniGameDataCollator, check_columns, check_rows
from .game.adversary import Adversary, SiteCapture
from .game.agreement import Agreement
from .game.buffer_pass import BufferPass
from .game.checkpoint import (  # noqa: F401  (kept importable from here)
    BUFFER_NAME,
    PERTURBER_DIR,
    PERTURBER_OPTIMIZER_NAME,
    _atomic_save,
    load_game_state,
    save_game_state,
)
from .game.context import STEP_KEY, StepContext
from .game.loss import LossParts, compose_loss
from .game.metrics import GameMetrics
from .game.mining import Miner
from .interfaces import VisualTokenInterface, get_interface, to_pil_images, unwrap_model
from .interfaces.base import keep_in_eval
from .perturber import Perturber
from .unigame_config import UniGameArguments, UniGameConfig


class _SeparateBufferStep(TrainerCallback):
    """`understanding_update="separate"`: the buffer's optimizer step runs right after the clean one, as in the
    authors' code, once per optimizer step (outside the accumulation window, so every process takes it together)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._separate_buffer_step()


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
        for module in self.interface.frozen_eval_modules:
            keep_in_eval(module)  # the Trainer's `model.train()` would otherwise reach the frozen VQ model
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
        self.perturber = perturber.to(device=args.device, dtype=torch.float32).attach(base)
        self.perturber.requires_grad_(True)
        # Off outside the game's own passes: `trainer.model` stays the clean model for evaluation and inference.
        self.perturber.enabled = False
        self.buffer = HardSampleBuffer(
            capacity=args.buffer_capacity,
            temperature=args.buffer_temperature,
            pop=args.buffer_pop,
            seed=args.seed + args.process_index,
        )
        # Mining decodes generated images: a model that cannot generate plays the game in embedding space only.
        self.mining_interval = args.mining_interval if self.interface.can_generate else 0
        if not self.interface.can_generate:
            _warn_embedding_only_game(args, type(base).__name__)
        if self.mining_interval and args.mining_image_size is not None:
            self.interface.generation_grid(args.mining_image_size)  # a size the generator cannot make fails here
        check = args.generation_check_interval if self.interface.can_generate else 0
        self.consistency_scorer = load_consistency_scorer(
            args, consistency_scorer, can_mine=bool(self.mining_interval or check)
        )
        if check and self.consistency_scorer is None:
            raise ValueError(
                "`generation_check_interval` scores clean generations with the consistency scorer, but there is none: "
                "pass a `consistency_scorer` (e.g. a task judge) or a `consistency_model`, or set "
                "`generation_check_interval=0`."
            )
        if (
            args.generation_loss_weight
            and type(self.interface).generation_loss is VisualTokenInterface.generation_loss
        ):
            raise ValueError(
                f"`generation_loss_weight` needs the model's image-generation loss, which {type(self.interface).__name__}"
                " does not provide: set `generation_loss_weight=0`."
            )
        self.game_metrics = GameMetrics()
        agreement = Agreement(self.accelerator, args.device)
        self.adversary = Adversary(self.perturber, args, self.game_metrics, agreement)
        self.miner = Miner(
            self.interface,
            self.adversary,
            self.buffer,
            args,
            self.game_metrics,
            self.consistency_scorer,
            interval=self.mining_interval,
            # One config object for the run: the interface keeps the compiled step per config.
            compile_config=args.mining_compile_config() if self.interface.can_generate else None,
        )
        self.buffer_pass = BufferPass(self.buffer, args, self.game_metrics, agreement, self._hard_sample_inputs)
        self._separate_stand_in = None  # the last clean batch, for the separate step's stand-in
        from .callbacks import HardSamplePicturesCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, HardSamplePicturesCallback):
                callback.trainer = self  # it draws from the buffer and asks the model for predictions
        if args.understanding_update == "separate":
            self.add_callback(_SeparateBufferStep(self))

    @property
    def perturber_optimizer(self) -> torch.optim.Optimizer:
        """The perturber's own optimizer (AdamW at `perturber_learning_rate`), outside the host's."""
        return self.adversary.optimizer

    def _describe_row(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _hard_sample_row(self, row: dict[str, Any], image) -> dict[str, Any]:
        raise NotImplementedError

    def _hard_sample_inputs(self, entries: list) -> dict[str, Any]:
        """Buffer entries as the host's prepared inputs: each a host row with its decoded image, through the collator."""
        rows = [self._hard_sample_row(e.row, to_pil_images(e.image.unsqueeze(0))[0]) for e in entries]
        batch = self.data_collator(rows)
        batch.pop(ROWS_KEY, None)
        return self._prepare_inputs(batch)

    # -------------------------------------------------------------------------------------------- the step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch of the game: perturber ascent, mining (once per optimizer step), understanding descent on
        the clean batch plus a buffer batch; the perturber steps once per accumulation window."""
        rows = inputs.pop(ROWS_KEY, None)
        if rows is None and self.mining_interval:
            raise ValueError(
                f"The batch has no {ROWS_KEY!r}: mining needs each row's question and answer. Wrap a custom collator "
                "in `trl_unigame.data.RowKeepingCollator`, or use the trainer's default collator."
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        ctx = StepContext(
            inputs=inputs,
            rows=rows,
            step=self.state.global_step,
            window=self.current_gradient_accumulation_steps,
            last_micro_batch=self.accelerator.sync_gradients,
            normalised_over_window=self._host_normalises_over_window(num_items_in_batch),
            num_items_in_batch=num_items_in_batch,
        )
        unwrapped = self.accelerator.unwrap_model(model)  # no DDP hooks: the game's own passes train nothing here
        if self.adversary.exact:
            self._exact_perturber_step(unwrapped, ctx)
        if rows is not None and self.miner.due(ctx.step, ctx.last_micro_batch):
            self.miner.mine(unwrapped, rows, inputs, ctx.step, self.args.process_index, self._prepare_inputs)
        if rows is not None and self.miner.check_due(ctx.step, ctx.last_micro_batch):
            self.miner.check_clean_generation(unwrapped, rows, self.args.process_index)
        if self.args.understanding_update == "mixed":
            ctx.buffer_batch = self.buffer_pass.draw(stand_in=inputs)
        else:
            self._separate_stand_in = inputs  # for the buffer step after the optimizer step
        with ExitStack() as stack:
            stack.enter_context(self.perturber.disabled())
            if self.adversary.first_order:
                ctx.capture = stack.enter_context(SiteCapture(self.interface))
            loss = super().training_step(model, {**inputs, STEP_KEY: ctx}, num_items_in_batch)
        if self.adversary.first_order:
            self.adversary.first_order_step(ctx.capture, ctx.merged_rows, ctx.window, ctx.step)
        if self.args.adversarial_weight and ctx.last_micro_batch:
            self.adversary.end_window()
        if ctx.last_micro_batch and Agreement.drop_non_finite_gradients(model):
            self.game_metrics.skip(ctx.step, "understanding", "the understanding loss or its gradient is not finite")
        return loss

    def _host_normalises_over_window(self, num_items_in_batch) -> bool:
        """Whether the host's loss comes normalised over the accumulation window, so that the Trainer does not divide
        it by the window (the Trainer's own rule)."""
        if getattr(self, "compute_loss_func", None) is not None:
            return True
        return num_items_in_batch is not None and bool(getattr(self, "model_accepts_loss_kwargs", False))

    def _exact_perturber_step(self, model: nn.Module, ctx: StepContext) -> None:
        """The perturber's ascent on the host loss of the clean batch with the perturbation active
        (`perturber_update="exact"`): its own forward and backward, normalised as the clean loss is."""

        def adversarial_loss():
            with self.compute_loss_context_manager(), self._host_metrics_paused():
                return self._host_loss(model, ctx.inputs, num_items_in_batch=ctx.num_items_in_batch)

        self.adversary.exact_step(adversarial_loss, ctx.share, ctx.window, ctx.step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """U's loss on a micro-batch of the game: the host's loss on the clean batch plus the buffer, perturbed and
        generation parts, composed by [`compose_loss`]. Outside the game's step (evaluation), the host's loss.

        With `return_outputs=True`, the host's own outputs of the clean pass come back beside the loss."""
        inputs.pop(ROWS_KEY, None)
        ctx: StepContext | None = inputs.pop(STEP_KEY, None)
        if ctx is None or not model.training:
            return self._host_loss(model, inputs, num_items_in_batch=num_items_in_batch, return_outputs=return_outputs)
        parts, outputs = self._loss_parts(model, inputs, ctx, return_outputs, num_items_in_batch)
        args = self.args
        composed = compose_loss(
            parts,
            perturbed_weight=args.perturbed_weight,
            generation_weight=args.generation_loss_weight,
            max_buffer_ratio=args.buffer_max_loss_ratio,
            window=ctx.window,
            normalised_over_window=ctx.normalised_over_window,
        )
        self.game_metrics.add("unigame/clean_loss", composed.clean)
        if composed.buffer_weight is not None and args.buffer_max_loss_ratio is not None:
            self.game_metrics.add("unigame/buffer_weight", composed.buffer_weight)
        if composed.buffer_share is not None:
            self.game_metrics.add("unigame/buffer_loss_share", composed.buffer_share)
        self.game_metrics.add("unigame/buffer_size", len(self.buffer))
        return (composed.loss, outputs) if return_outputs else composed.loss

    def _loss_parts(self, model, inputs, ctx: StepContext, return_outputs: bool, num_items_in_batch):
        """Runs the passes of U's loss (clean, or clean + buffer as one batch; buffer; perturbed; generation)."""
        batch = ctx.buffer_batch
        merged = None
        if batch is not None and not return_outputs and self.args.one_pass_update:
            merged, batch = self.buffer_pass.merge(inputs, batch, self._concatenate_inputs())
        buffer_loss = outputs = None
        with ctx.capture.recording() if ctx.capture is not None else ExitStack():
            if merged is not None:
                # One forward and backward over clean + buffer rows; each part keeps its own mean, as in two passes.
                n = len(inputs["input_ids"])
                ctx.merged_rows = (n, len(merged["input_ids"]))
                per_sample = self._host_loss_per_sample(model, merged)[1]
                clean, buffer_loss = per_sample[:n].mean(), per_sample[n:].mean()
                self.buffer_pass.note(batch, buffer_loss, per_sample[n:])
            else:
                result = self._host_loss(
                    model, inputs, num_items_in_batch=num_items_in_batch, return_outputs=return_outputs
                )
                clean, outputs = result if return_outputs else (result, None)
        if merged is None and batch is not None:
            with self._host_metrics_paused():
                buffer_loss = self.buffer_pass.loss(self._host_loss_per_sample, model, batch)
        parts = LossParts(clean=clean, buffer=buffer_loss, buffer_weight=batch.weight if batch is not None else 0.0)
        if self.args.perturbed_weight:
            parts.perturbed = self._perturbed_loss(model, inputs, num_items_in_batch)
        if self.args.generation_loss_weight and ctx.rows is not None:
            parts.generation = self._generation_loss(model, inputs, ctx.rows)
        return parts, outputs

    def _separate_buffer_step(self) -> None:
        """The authors' variant: after the optimizer step on the clean batch, one more step on a buffer batch alone."""
        model = self.model_wrapped
        batch = self.buffer_pass.draw(stand_in=self._separate_stand_in)
        self._separate_stand_in = None
        if batch is None:
            return
        model.zero_grad()  # the clean step has used its gradients
        with self.perturber.disabled(), self.compute_loss_context_manager(), self._host_metrics_paused():
            loss = batch.weight * self.buffer_pass.loss(self._host_loss_per_sample, model, batch)
        # Backward even when the loss is not finite: it is a collective under DDP; the update is dropped after it.
        self.accelerator.backward(loss)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        if Agreement.drop_non_finite_gradients(model):
            self.game_metrics.skip(self.state.global_step, "understanding", "the buffer step's loss is not finite")
        self.optimizer.step()
        model.zero_grad()

    def _generation_loss(self, model, inputs: dict[str, Any], rows: list[dict[str, Any]]) -> torch.Tensor:
        """The model's image-generation loss on the clean batch's (prompt, image) pairs (`generation_loss_weight`)."""
        images = self.interface.source_images(inputs)
        prompts = [r["prompt"] for r in rows]
        if images is None or len(images) != len(prompts):
            raise ValueError(
                "`generation_loss_weight` needs one image per row that the interface can recover from the batch "
                f"({type(self.interface).__name__}.source_images); set `generation_loss_weight=0` for this data."
            )
        loss = self.interface.generation_loss(model, prompts, images).mean()
        self.game_metrics.add("unigame/generation_loss", float(loss.detach()))
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
        self.game_metrics.add("unigame/perturbed_loss", float(loss.detach()))
        return loss

    # ------------------------------------------------------------------------------------------- host hooks
    def _host_loss(self, model, inputs, num_items_in_batch=None, return_outputs=False):
        """The host trainer's loss (a scalar), with the host's outputs when `return_outputs`."""
        return super().compute_loss(
            model, dict(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _host_loss_per_sample(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The host loss and, where the host can tell, each sample's own loss (`None` otherwise)."""
        return self._host_loss(model, inputs), None

    def _concatenate_inputs(self):
        """`(clean, buffer) -> one batch or None` when this host can run both in one forward (`one_pass_update`),
        else `None` (the TRL hosts: their losses are not per sample)."""
        return None

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

    # ------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs only (every process logs together); evaluation passes through
            logs = {**logs, **self.game_metrics.reduce()}
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
        save_game_state(
            output_dir,
            perturber_optimizer=self.perturber_optimizer,
            buffer=self.buffer,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
            should_save=self.args.should_save,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        load_game_state(
            checkpoint,
            perturber=self.perturber,
            perturber_optimizer=self.perturber_optimizer,
            buffer=self.buffer,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
        )


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

    def _concatenate_inputs(self):
        return self.interface.concatenate_inputs

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
