"""UniGame on top of TRL's `SFTTrainer` and `DPOTrainer`: the host trainer's loss is the game's loss."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .consistency import load_consistency_scorer
from .data import RowKeepingCollator, as_text, check_columns, first_turn, message_text
from .interfaces import get_interface
from .unigame_config import UniGameArguments, _setup_devices
from .unigame_mixin import UniGameMixin, _seed


@dataclass
class UniGameSFTConfig(SFTConfig, UniGameArguments):
    r"""
    TRL's `SFTConfig` plus the fields of [`UniGameArguments`], for [`UniGameSFTTrainer`].

    Vision datasets need `remove_unused_columns=False` (the default here). Note that `SFTConfig` defaults to bf16
    and gradient checkpointing; on a CPU set `use_cpu=True` or `bf16=False`.
    """

    _setup_devices = cached_property(_setup_devices)

    def __post_init__(self):
        self.remove_unused_columns = False
        super().__post_init__()
        self._validate_unigame()


@dataclass
class UniGameDPOConfig(DPOConfig, UniGameArguments):
    r"""
    TRL's `DPOConfig` plus the fields of [`UniGameArguments`], for [`UniGameDPOTrainer`].
    """

    _setup_devices = cached_property(_setup_devices)

    def __post_init__(self):
        self.remove_unused_columns = False
        super().__post_init__()
        self._validate_unigame()


def _prompt(row, column: str, question: str) -> str:
    """The row's generation prompt: its `column` (e.g. a caption, or the first of a list of captions), else the question."""
    value = row.get(column)
    return as_text(value, column) if value not in (None, "", []) else question


class _StackedGame(UniGameMixin):
    """Set-up shared by the TRL hosts: LoRA targets restricted to the LLM, column checks, the row-keeping collator."""

    _required_columns: tuple[str, ...] = ()

    def __init__(self, model, args=None, *, perturber=None, consistency_scorer=None, peft_config=None, **kwargs):
        if args is not None and not isinstance(args, UniGameArguments):
            raise TypeError(f"`args` must carry the UniGame fields ({self._config_name}), got {type(args).__name__}.")
        if isinstance(model, str):
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(model)
        interface = get_interface(model, kwargs.get("processing_class"))
        if args is not None:
            consistency_scorer = load_consistency_scorer(args, consistency_scorer, can_mine=interface.can_generate)
        if peft_config is not None and getattr(peft_config, "target_modules", None) is None:
            peft_config.target_modules = interface.lora_target_modules
        check_columns(
            kwargs.get("train_dataset"),
            list(self._required_columns),
            "train_dataset",
            "UniGame stacking needs the image column (`images` or `image`) to play the game on.",
        )
        if args is not None:
            _seed(args)  # the host draws the LoRA weights before `Trainer.__init__` seeds
        super().__init__(model, args=args, peft_config=peft_config, **kwargs)
        self.interface = get_interface(self.model, self.processing_class)
        self.data_collator = RowKeepingCollator(self.data_collator, self._describe_row)
        self._init_game(perturber, consistency_scorer)


class UniGameSFTTrainer(_StackedGame, SFTTrainer):
    r"""
    TRL's `SFTTrainer` playing the UniGame game: the perturber ascends SFT's loss with its perturbation active,
    mined hard samples are new SFT rows (the same conversation, the decoded hard image), and the model descends SFT's
    loss on clean rows plus `buffer_weight` times the loss on hard rows.

    Takes the arguments of `trl.SFTTrainer`, with `args` a [`UniGameSFTConfig`], plus:

    Args:
        perturber ([`Perturber`], *optional*): A perturber to continue training; a fresh one when `None`.
        consistency_scorer (`Callable`, *optional*): `(images, texts) -> scores`; defaults to CLIP from
            `args.consistency_model`.

    The dataset is TRL's conversational vision format: `messages` and `images`. The first user turn is the
    question (and the generation prompt), the first assistant turn the answer.
    """

    _tag_names = ["trl", "sft", "unigame"]
    _config_name = "UniGameSFTConfig"
    _required_columns = ("messages", "images")

    def _describe_row(self, row):
        question = first_turn(row["messages"], "user")
        return {
            "question": question,
            "answer": first_turn(row["messages"], "assistant"),
            "prompt": _prompt(row, self.args.prompt_column, question),
            "messages": row["messages"],
        }

    def _hard_sample_row(self, row, image):
        return {"messages": row["messages"], "images": [image]}


class UniGameDPOTrainer(_StackedGame, DPOTrainer):
    r"""
    TRL's `DPOTrainer` playing the UniGame game: the perturber ascends the preference loss with its perturbation
    active, candidates are mined on the prompt and the preferred answer, and the model descends the preference loss
    on clean pairs plus `buffer_weight` times the loss on pairs whose image is a decoded hard sample.

    Takes the arguments of `trl.DPOTrainer`, with `args` a [`UniGameDPOConfig`], plus `perturber` and
    `consistency_scorer` as in [`UniGameSFTTrainer`]. With a `peft_config` no separate reference model is needed
    (the reference is the model with its adapter disabled).

    The dataset has `prompt`, `chosen`, `rejected` and `images` (conversational or plain text).
    """

    _tag_names = ["trl", "dpo", "unigame"]
    _config_name = "UniGameDPOConfig"
    _required_columns = ("prompt", "chosen", "rejected", "images")

    def _describe_row(self, row):
        question = message_text(row["prompt"])
        return {
            "question": question,
            "answer": message_text(row["chosen"]),
            "prompt": _prompt(row, self.args.prompt_column, question),
            "pair": {k: row[k] for k in ("prompt", "chosen", "rejected")},
        }

    def _hard_sample_row(self, row, image):
        return {**row["pair"], "images": [image]}
