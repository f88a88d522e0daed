"""UniGame: [`UniGameTrainer`], a `transformers.Trainer` that plays the game (the game itself: `unigame_mixin.py` and
`trl_unigame/game/`)."""

from __future__ import annotations

import os
import warnings

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
        """Writes `README.md` in the output directory: the base model and the code that loads it, the dataset, tags
        (`trl`, `unigame`), the consistency scorer that filtered mined candidates, the game's configuration and the
        paper's citation. The arguments are kept: every later save (checkpoints included) writes the same card.

        Args:
            model_name (`str`, *optional*): The card's title; the output directory's name by default.
            dataset_name (`str`, *optional*): Hub id of the training dataset.
            tags (`str` or `list[str]`, *optional*): Tags added to `trl` and `unigame`.
        """
        self._model_card_arguments = dict(
            model_name=model_name, dataset_name=dataset_name or kwargs.get("dataset"), tags=tags
        )
        if self.is_world_process_zero():
            self._write_model_card(self.args.output_dir)

    def _write_model_card(self, folder: str) -> None:
        """Writes the UniGame model card to `folder/README.md` (over PEFT's template when PEFT wrote one there)."""
        from dataclasses import fields

        from peft import PeftModel

        from .model_card import base_model_reference, describe_consistency_scorer, unigame_model_card

        arguments = getattr(self, "_model_card_arguments", {})
        tags = arguments.get("tags")
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        base_model, base_model_code = base_model_reference(
            getattr(unwrap_model(self.model).config, "_name_or_path", None)
        )
        same_folder = os.path.abspath(folder) == os.path.abspath(self.args.output_dir)
        hub_model_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        # Loaded from the Hub once pushed; a checkpoint or a local run from its folder.
        model_path = hub_model_id if same_folder and self.args.push_to_hub and hub_model_id else folder
        game = {f.name: getattr(self.args, f.name) for f in fields(UniGameArguments)}
        scorer = getattr(self, "consistency_scorer", None)
        from .consistency import CLIPConsistencyScorer

        game["consistency_model"] = (
            getattr(scorer.model, "name_or_path", None) if isinstance(scorer, CLIPConsistencyScorer) else None
        )
        game["consistency_scorer"] = describe_consistency_scorer(scorer)
        guidance, temperature = self.interface.generation_settings(
            self.args.generation_guidance_scale, self.args.generation_temperature
        )  # what generation used: the model's own where the configuration left them `None`
        game["generation_guidance_scale"], game["generation_temperature"] = guidance, temperature
        name = arguments.get("model_name") or os.path.basename(os.path.normpath(self.args.output_dir))
        if not same_folder:
            name = f"{name} ({os.path.basename(os.path.normpath(folder))})"
        card = unigame_model_card(
            model_name=name,
            base_model=base_model,
            dataset_name=arguments.get("dataset_name"),
            tags=tags + list(self._tag_names),
            unigame_config=game,
            trainer_name=type(self).__name__,
            base_model_code=base_model_code,
            model_path=model_path,
            consistency_scorer=game["consistency_scorer"],
            adapter=isinstance(self.model, PeftModel),
        )
        os.makedirs(folder, exist_ok=True)
        card.save(os.path.join(folder, "README.md"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the model (LoRA adapter or full model), the processor and `perturber/` as `transformers.Trainer`
        does, then writes the UniGame model card in the folder, over PEFT's template: the final folder and every
        checkpoint describe the run that made them and how to load them."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self._write_model_card(output_dir if output_dir is not None else self.args.output_dir)

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
        with warnings.catch_warnings():
            # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (FutureWarning) in favour of
            # `is_activation_checkpointing`; the read is PEFT's own.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, peft_config)
    elif not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            param.requires_grad_(interface.is_understanding_parameter(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("The understanding player has no trainable parameter: check `peft_config` or the adapter.")
    return model
