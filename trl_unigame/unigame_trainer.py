"""UniGame: [`UniGameTrainer`], a `transformers.Trainer` that plays the game (the game itself: `unigame_mixin.py` and
`trl_unigame/game/`)."""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from .consistency import load_consistency_scorer
from .data import ROWS_KEY, UniGameDataCollator, check_columns, check_rows
from .game.adversary import generation_budget  # noqa: F401  (kept importable from here)
from .game.checkpoint import BUFFER_NAME, PERTURBER_DIR, PERTURBER_OPTIMIZER_NAME  # noqa: F401
from .interfaces import get_interface, unwrap_model
from .perturber import Perturber
from .unigame_config import UniGameArguments, UniGameConfig
from .unigame_mixin import UniGameMixin, _seed


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
