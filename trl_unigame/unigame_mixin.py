"""The UniGame mixin: the two-player training step on top of a `transformers.Trainer` host ([`UniGameTrainer`], or
TRL's trainers through the stacking classes).

The mixin orchestrates; the game's parts live in `trl_unigame.game`: the per-step context (`context`), the
adversary's step (`adversary`), mining (`mining`), the buffer pass (`buffer_pass`), U's passes (`understanding`) and
the composition of its loss (`loss`), agreement between processes (`agreement`), checkpoints (`checkpoint`) and
metrics (`metrics`).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .buffer import HardSampleBuffer
from .consistency import load_consistency_scorer
from .data import ROWS_KEY
from .game.adversary import Adversary, SiteCapture, build_perturber
from .game.agreement import Agreement, check_one_run_across_processes
from .game.anchors import GenerationAnchors, has_adapter
from .game.buffer_pass import BufferPass
from .game.checkpoint import GameCheckpointing
from .game.context import STEP_KEY, StepContext
from .game.generation_adversary import GenerationAdversary
from .game.metrics import GameMetrics
from .game.mining import Miner
from .game.precision import active_grad_scaler, backward_loss_scale
from .game.sharding import check_deepspeed_options, check_fsdp_options, full_parameters, reshard, shard_on_cpu
from .game.understanding import HostHooks, UnderstandingPasses, host_metrics_paused, host_normalises_over_window
from .interfaces import VisualTokenInterface, to_pil_images, unwrap_model
from .interfaces.base import keep_in_eval
from .perturber import Perturber
from .unigame_config import UniGameArguments


class _SeparateBufferStep(TrainerCallback):
    """`understanding_update="separate"`: the buffer's optimizer step runs right after the clean one, as in the
    authors' code, once per optimizer step (outside the accumulation window, so every process takes it together)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._separate_buffer_step()


class UniGameMixin(GameCheckpointing):
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
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        shard_on_cpu(self)  # FSDP asked for on a CPU: shard, as on GPUs, instead of training data-parallel copies

    def _init_game(self, perturber: Perturber | None, consistency_scorer) -> None:
        args: UniGameArguments = self.args
        check_one_run_across_processes(args)
        check_fsdp_options(self)
        check_deepspeed_options(self)
        base = unwrap_model(self.model)
        for module in self.interface.frozen_eval_modules:
            keep_in_eval(module)  # the Trainer's `model.train()` would otherwise reach the frozen VQ model
        if perturber is None:
            perturber = build_perturber(base, args)
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
        _check_game_options(args, self.interface, self.consistency_scorer, check)
        _check_generation_adversary(args, self.interface, self.consistency_scorer, self.perturber)
        self.game_metrics = GameMetrics()
        agreement = self.agreement = Agreement(self.accelerator, args.device)
        self.adversary = Adversary(self.perturber, args, self.game_metrics, agreement)
        self.generation_adversary = (
            GenerationAdversary(self.perturber, self.interface, args, self.game_metrics, agreement)
            if args.generation_adversary == "reinforce"
            else None
        )
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
            generation_adversary=self.generation_adversary,
        )
        self.buffer_pass = BufferPass(self.buffer, args, self.game_metrics, agreement, self._hard_sample_inputs)
        hooks = HostHooks(  # looked up at each call, so a subclass (or a test) may replace a host method later
            loss=lambda *a, **k: self._host_loss(*a, **k),
            loss_per_sample=lambda *a: self._host_loss_per_sample(*a),
            metrics_paused=lambda: self._host_metrics_paused(),
            concatenate=self._concatenate_inputs(),
        )
        self.understanding = UnderstandingPasses(
            hooks, self.interface, self.perturber, self.buffer_pass, args, self.game_metrics
        )
        self.anchors = None
        if args.generation_loss_targets == "anchors":
            _check_generation_anchors(self.model)
            self.anchors = GenerationAnchors(self.interface, self.perturber, args, self.game_metrics)
            self.understanding.anchors = self.anchors
            self._anchors_complete = False  # every process holds all its anchors (no more votes)
        self._separate_stand_in = None  # the last clean batch, for the separate step's stand-in
        from .callbacks import HardSamplePicturesCallback, use_short_console_logs

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, HardSamplePicturesCallback):
                callback.trainer = self  # it draws from the buffer and asks the model for predictions
        use_short_console_logs(self)  # one short line per log on the console; trackers get every key
        if args.understanding_update == "separate":
            self.add_callback(_SeparateBufferStep(self))

    @property
    def perturber_optimizer(self) -> torch.optim.Optimizer:
        """The perturber's own optimizer (AdamW at `perturber_learning_rate`), outside the host's."""
        return self.adversary.optimizer

    @property
    def generation_adversary_optimizer(self) -> torch.optim.Optimizer | None:
        """The generation-side adversary's own optimizer (AdamW at `generation_adversary_learning_rate`), or `None`
        when `generation_adversary="none"`."""
        return None if self.generation_adversary is None else self.generation_adversary.optimizer

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
        if rows is None and (self.mining_interval or self.anchors is not None):
            needs = (
                "mining needs each row's question and answer"
                if self.mining_interval
                else ("generation anchors are drawn from each row's prompt")
            )
            raise ValueError(
                f"The batch has no {ROWS_KEY!r}: {needs}. Wrap a custom collator in "
                "`trl_unigame.data.RowKeepingCollator`, or use the trainer's default collator."
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        ctx = StepContext(
            inputs=inputs,
            rows=rows,
            step=self.state.global_step,
            window=self.current_gradient_accumulation_steps,
            last_micro_batch=self.accelerator.sync_gradients,
            normalised_over_window=host_normalises_over_window(self, num_items_in_batch),
            num_items_in_batch=num_items_in_batch,
        )
        unwrapped = self.accelerator.unwrap_model(model)  # no DDP hooks: the game's own passes train nothing here
        if self.adversary.exact:
            self._exact_perturber_step(unwrapped, ctx)
            if ctx.last_micro_batch:
                self.adversary.end_window(ctx.step)  # mining and U's perturbed pass then meet the updated perturber
        mining = rows is not None and self.miner.due(ctx.step, ctx.last_micro_batch)
        checking = rows is not None and self.miner.check_due(ctx.step, ctx.last_micro_batch)
        anchoring = self._new_anchor_prompts(rows)
        if mining or checking or anchoring is not None:
            # Generation calls submodules directly: under FSDP2 or ZeRO-3 the parameters are gathered whole around it.
            # The host's bf16 autocast covers its model's forward only: generation calls the submodules directly, so
            # it would otherwise run in the weights' dtype (float32 for a float32-loaded model). Not fp16: the token
            # loop's residual stream would then be fp16 too, and overflow where training's float32 one does not.
            with full_parameters(model), self._mining_autocast():
                if anchoring is not None:
                    self.anchors.draw(unwrapped, anchoring, ctx.step, self.args.process_index)
                if mining:
                    self.miner.mine(unwrapped, rows, inputs, ctx.step, self.args.process_index, self._prepare_inputs)
                if checking:
                    self.miner.check_clean_generation(unwrapped, rows, self.args.process_index)
        if self.args.understanding_update == "mixed":
            ctx.buffer_batch = self.buffer_pass.draw(stand_in=inputs)
        else:
            self._separate_stand_in = inputs  # for the buffer step after the optimizer step
        # DeepSpeed updates its fp16 loss scale inside the backward at the window's end: the scale the backward used
        # is the one before it.
        scale = backward_loss_scale(self.accelerator, model) if self.adversary.first_order else 1.0
        with ExitStack() as stack:
            stack.enter_context(self.perturber.disabled())
            if self.adversary.first_order or (self.perturber.sees_gradient and self.args.perturbed_weight):
                ctx.capture = stack.enter_context(SiteCapture(self.interface))
            loss = super().training_step(model, {**inputs, STEP_KEY: ctx}, num_items_in_batch)
        if mining or checking or anchoring is not None:
            reshard(model)  # FSDP2 would otherwise keep its root's parameters whole after this step
        if self.adversary.first_order:
            # under fp16 the host's backward left the token gradient times the loss scale
            self.adversary.first_order_step(ctx.capture, ctx.merged_rows, ctx.window, ctx.step, loss_scale=scale)
            if ctx.last_micro_batch:
                self.adversary.end_window(ctx.step)
        scaler = active_grad_scaler(self.accelerator)
        if ctx.last_micro_batch and self.agreement.step_dropped(model, scaler):
            self.game_metrics.skip(ctx.step, "understanding", _non_finite_reason(scaler))
        return loss

    def _new_anchor_prompts(self, rows) -> list[str] | None:
        """The batch's prompts to draw as generation anchors now, or `None` when no process draws at this micro-batch.
        Drawing gathers sharded parameters, so every process draws (maybe nothing) when any has new prompts; once no
        process has room left, no more votes are taken."""
        if self.anchors is None or self._anchors_complete:
            return None
        new = self.anchors.new_prompts(rows)
        drawing, room = self.agreement.any_processes([bool(new), not self.anchors.full])
        if not room:
            self._anchors_complete = True
        return new if drawing else None

    def _mining_autocast(self):
        """The run's autocast for mining's own forwards under bf16; none otherwise (fp16 mining stays in the weights'
        dtype)."""
        return self.accelerator.autocast() if self.accelerator.mixed_precision == "bf16" else nullcontext()

    def _exact_perturber_step(self, model: nn.Module, ctx: StepContext) -> None:
        """The perturber's ascent on the host loss of the clean batch with the perturbation active
        (`perturber_update="exact"`): its own forward and backward, normalised as the clean loss is."""

        def loss():
            with self.compute_loss_context_manager(), self._host_metrics_paused():
                return self._host_loss(model, ctx.inputs, num_items_in_batch=ctx.num_items_in_batch)

        gradient = None
        if self.perturber.sees_gradient:  # U's gradient at the clean tokens: a pass and a backward to them
            with self.perturber.disabled(), SiteCapture(self.interface) as capture, capture.recording():
                gradient = capture.site_gradient(loss())
        with self.perturber.gradients(understanding=gradient):
            self.adversary.exact_step(loss, ctx.share, ctx.window, ctx.step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """U's loss on a micro-batch of the game: the host's loss on the clean batch plus the buffer, perturbed and
        generation parts, composed by [`compose_loss`]. Outside the game's step (evaluation), the host's loss.

        With `return_outputs=True`, the host's own outputs of the clean pass come back beside the loss."""
        inputs.pop(ROWS_KEY, None)
        ctx: StepContext | None = inputs.pop(STEP_KEY, None)
        if ctx is None or not model.training:
            return self._host_loss(model, inputs, num_items_in_batch=num_items_in_batch, return_outputs=return_outputs)
        parts, outputs = self.understanding.parts(model, inputs, ctx, return_outputs)
        loss = self.understanding.compose(parts, ctx)
        return (loss, outputs) if return_outputs else loss

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
        scaler = active_grad_scaler(self.accelerator)
        if self.agreement.drop_non_finite_gradients(model, scaler):
            self.game_metrics.skip(
                self.state.global_step, "understanding", _non_finite_reason(scaler, "buffer step's ")
            )
        self.optimizer.step()
        model.zero_grad()

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

    def _host_metrics_paused(self):
        """A context in which the host's own metrics are left as they were (see [`host_metrics_paused`])."""
        return host_metrics_paused(self)

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
        # Under FSDP2 or ZeRO-3 the parameters are gathered whole: processes answer different numbers of rows.
        with self.perturber.disabled(), full_parameters(self.model_wrapped):
            generated = evaluator.evaluate(dataset)
        generated = {f"{metric_key_prefix}_{name}": value for name, value in generated.items()}
        self.log(generated)
        metrics.update(generated)
        return metrics


def _non_finite_reason(scaler, what: str = "") -> str:
    """Why an update of U is skipped: a non-finite loss or gradient, or, under an fp16 scaler, its overflow."""
    if scaler is not None:
        return (
            f"the {what}gradient is not finite under fp16 loss scaling (an overflow, or a non-finite loss): the "
            "GradScaler skips the update and lowers its scale"
        )
    return f"the {what or 'understanding '}loss or its gradient is not finite"


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


def _check_game_options(args, interface, scorer, check_interval: int) -> None:
    """Options that need what this model or run lacks: a clear error before any training."""
    if check_interval and scorer is None:
        raise ValueError(
            "`generation_check_interval` scores clean generations with the consistency scorer, but there is none: "
            "pass a `consistency_scorer` (e.g. a task judge) or a `consistency_model`, or set "
            "`generation_check_interval=0`."
        )
    if args.generation_loss_weight and type(interface).generation_loss is VisualTokenInterface.generation_loss:
        raise ValueError(
            f"`generation_loss_weight` needs the model's image-generation loss, which {type(interface).__name__} does "
            "not provide: set `generation_loss_weight=0`."
        )


def _check_generation_anchors(model) -> None:
    """`generation_loss_targets="anchors"` needs what this model lacks: a clear error before any training (a model
    without a generation loss is refused with `generation_loss_weight`)."""
    if not has_adapter(model):
        raise ValueError(
            "`generation_loss_targets='anchors'` draws its anchors with the model's adapter off (the generator as "
            f"loaded, on a resume too), but the model ({type(model).__name__}) has no PEFT adapter: pass a "
            "`peft_config` (or a `PeftModel`), or use `generation_loss_targets='batch'`."
        )


def _check_generation_adversary(args, interface, scorer, perturber) -> None:
    """`generation_adversary` needs what this model or run lacks: a clear error before any training."""
    if args.generation_adversary == "none":
        return
    option = f"`generation_adversary={args.generation_adversary!r}`"
    model_name = type(interface.base_model).__name__
    if not interface.can_generate:
        raise ValueError(
            f"{option} trains the perturber on decoded candidates, but {model_name} cannot generate images: set "
            "`generation_adversary='none'` (a unified model such as Janus-Pro or Emu3 can generate)."
        )
    _, temperature = interface.generation_settings(args.generation_guidance_scale, args.generation_temperature)
    if temperature <= 0:
        raise ValueError(
            f"{option} follows the log-probability of the sampled image tokens, but generation is greedy (temperature "
            f"{temperature}, from the model's generation config): set a positive `generation_temperature`, or "
            "`generation_adversary='none'`."
        )
    if type(interface).image_token_log_probs is VisualTokenInterface.image_token_log_probs:
        raise ValueError(
            f"{option} needs the log-probability of sampled image tokens, which {type(interface).__name__} does not "
            "provide (`image_token_log_probs`): set `generation_adversary='none'`."
        )
    if scorer is None:
        raise ValueError(
            f"{option} rewards only faithful candidates, judged by the consistency scorer, but there is none: pass a "
            "`consistency_scorer` (e.g. a task judge) or a `consistency_model`, or set `generation_adversary='none'`."
        )
    if "generation" not in perturber.config.sites:
        raise ValueError(
            f"{option} trains the perturber at the generation site, but this perturber acts only at "
            f"{perturber.config.sites}: build it with `sites=['understanding', 'generation']` (or pass none and let "
            "the trainer build one from `perturber_sites`), or set `generation_adversary='none'`."
        )


def _seed(args) -> None:
    """Seeds every RNG from `args.seed` (fully deterministic with `args.full_determinism`), as `Trainer` does."""
    from transformers.trainer_utils import enable_full_determinism, set_seed

    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
