# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
UniGame self-adversarial post-training of Janus / Janus-Pro, or of any model family in docs/models.md (Emu3; LLaVA,
Qwen2-VL, ... in the embedding-only game): `--model_name_or_path` picks the family by itself.

With no arguments, fine-tunes the tiny Janus pretrained on real digit scans (shipped in the package) with UniGame (the
recipe that measured best against plain fine-tuning, docs/benchmarks.md) on a skill it never learned ("What digit is
after this?"), offline on a CPU in about a minute, and prints its accuracy on held-out scans before and after (clean,
under attack, round trip; `--compare_sft true` adds plain fine-tuning); any option replaces just that setting:

```bash
accelerate launch --config_file examples/accelerate_configs/single_process.yaml examples/train_janus.py
accelerate launch --config_file examples/accelerate_configs/single_process.yaml examples/train_janus.py \
    --max_steps 50 --output_dir quick-run
```

(`single_process.yaml` gives accelerate every value it would otherwise fill in and print; `--load_in_4bit` quantizes
the shipped model too.) Your own rows (an `image` column, or image files with a `metadata.jsonl` holding `file_name`,
`question` and `answer`) train the shipped model with the same settings:

```bash
python examples/train_janus.py --dataset_name imagefolder --dataset_data_files 'mydata/train/*' --max_steps 50
```

On a real model and dataset (one GPU; add an accelerate config from examples/accelerate_configs for several):

```bash
accelerate launch examples/train_janus.py \
    --model_name_or_path deepseek-community/Janus-Pro-1B \
    --dataset_name HuggingFaceM4/VQAv2 --dataset_train_split train \
    --dtype bfloat16 --use_peft --lora_r 16 --lora_alpha 32 \
    --per_device_train_batch_size 4 --learning_rate 2e-5 --max_steps 16000 \
    --output_dir Janus-Pro-1B-UniGame

# QLoRA: add --load_in_4bit; a YAML file with the same keys works with --config
```
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_unigame import UniGameConfig, UniGameTrainer
from trl_unigame.data import to_vqa_format
from trl_unigame.game.sharding import full_parameters


# `--consistency_model digit_judge`: the digit judge shipped with the tiny digits model scores mined candidates.
DIGIT_JUDGE = "digit_judge"


@dataclass
class UniGameScriptArguments(ScriptArguments):
    r"""
    Arguments of this script besides the training and model arguments.

    Args:
        image_column (`str`, *optional*, defaults to `"image"`): Column holding the image.
        question_column (`str`, *optional*, defaults to `"question"`): Column holding the question.
        answer_column (`str`, *optional*, defaults to `"answer"`): Column holding the answer (VQAv2 `answers` lists
            are reduced to their majority answer).
        dataset_data_files (`str`, *optional*): Local data files (json, csv, parquet, imagefolder) instead of a
            Hub dataset; `--dataset_name` then names the builder (e.g. `parquet`).
        max_train_samples (`int`, *optional*): Keep only this many training rows.
        picture_steps (`int`, *optional*, defaults to `0`): Every this many steps, write a gallery of hard samples and
            plots of eps and the losses to `output_dir/pictures/` and log them to the `--report_to` trackers; `0`
            turns it off.
        compare_scans (`int`, *optional*, defaults to `120`): Offline default only: held-out test scans on which the
            model is evaluated before and after training (clean, under attack, round trip); `0` skips it.
        compare_sft (`bool`, *optional*, defaults to `False`): Offline default only: also train the same steps with
            the game switched off (plain fine-tuning) and add its column to the table, to show what the game adds.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, or a builder with data files."})
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer (or `answers`)."})
    dataset_data_files: str | None = field(default=None, metadata={"help": "Local data files to load."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    picture_steps: int = field(default=0, metadata={"help": "Write hard-sample pictures every N steps; 0 = off."})
    compare_scans: int = field(
        default=120, metadata={"help": "Offline default: test scans evaluated before and after training; 0 = skip."}
    )
    compare_sft: bool = field(
        default=False,
        metadata={"help": "Offline default: also train the same steps without the game and print its column."},
    )


def offline_default_arguments(output_dir: str = "unigame-janus-tiny") -> list[str]:
    """The embedded default run: the pretrained tiny digits Janus, its digits data (or the rows of `--dataset_name`),
    CPU-sized settings (the effect benchmark's UniGame settings, see docs/benchmarks.md); hard-sample galleries and
    curves every 100 steps."""
    settings = {
        "output_dir": output_dir,
        "max_steps": "200",
        "per_device_train_batch_size": "8",
        "learning_rate": "1e-3",
        "lr_scheduler_type": "constant",
        "logging_steps": "0.1",  # a tenth of the run (Trainer's ratio): ten logs whatever `--max_steps`
        "save_steps": "100",
        "report_to": "none",
        "bf16": "false",
        "lora_r": "16",
        "lora_alpha": "32",
        "picture_steps": "100",
        **OFFLINE_GAME,
    }
    return [part for key, value in settings.items() for part in (f"--{key}", value)] + ["--use_peft"]


# The game on the tiny digits model (budgets relative to the token norm; the digit judge filters candidates), with
# the recipe that measured best against plain fine-tuning in docs/benchmarks.md (`RECOMMENDED_RECIPE`).
RECOMMENDED_RECIPE = {
    "perturber_inputs": "features_and_gradient",  # the perturber reads U's loss gradient at each token
    "perturber_update": "first_order",  # its step from the clean backward, no extra pass through the model
    "perturbed_weight": "0.5",  # U trains on its perturbed tokens too
}
OFFLINE_GAME = {
    **RECOMMENDED_RECIPE,
    "consistency_model": DIGIT_JUDGE,
    "adversarial_weight": "1.0",
    "perturber_learning_rate": "5e-3",
    "perturber_budget": "relative",
    "perturber_eps_max": "0.1",
    "perturber_eps_init": "0.05",
    "perturber_generation_budget": "relative",
    "perturber_generation_eps_max": "0.05",
    "num_candidates": "3",
    "generation_guidance_scale": "3.0",
    "generation_temperature": "0.7",
    "consistency_threshold": "0.9",
    "buffer_weight": "0.25",
    "buffer_capacity": "50",
    "buffer_max_age": "50",
    "generation_loss_weight": "1.0",
}


# A model of the user's own (`--model_name_or_path`): the recommended recipe with budgets relative to its token norm
# (an absolute budget would mean something else at every model's token scale); mining at the model's own image size
# and with its own generation config (guidance, temperature), which the config's defaults already take.
USER_MODEL_GAME = {
    **RECOMMENDED_RECIPE,
    "perturber_budget": "relative",
    "perturber_eps_max": "0.1",
    "perturber_eps_init": "0.05",
    "perturber_generation_budget": "relative",
    "perturber_generation_eps_max": "0.05",
}


def user_model_default_arguments() -> list[str]:
    """The settings a run on a user's own model starts from (`USER_MODEL_GAME`); each option given replaces its own."""
    return [part for key, value in USER_MODEL_GAME.items() for part in (f"--{key}", value)]


# The built-in data's skills: the new one ("What digit is after this?") mixed with a pretrained one.
DIGITS_SKILLS = ("after", "digit")
# What a run trained on, written to `output_dir` for `evaluate_janus.py` to read back.
TRAINING_DATA_FILE = "training_data.json"


def training_data_record(script_args, training_args) -> dict:
    """What the run trains on: the built-in digits and their skills (the new one first), or the dataset options
    (local data files as absolute paths), so that an evaluation can ask the adapter what it was trained on."""
    if script_args.dataset_name is None:
        return {"dataset_name": None, "digits_skills": list(DIGITS_SKILLS), "new_skills": [DIGITS_SKILLS[0]]}
    files = script_args.dataset_data_files
    local = files is not None and not files.startswith(("hf://", "http://", "https://"))
    return {
        "dataset_name": script_args.dataset_name,
        "dataset_config": script_args.dataset_config,
        "dataset_data_files": os.path.abspath(os.path.expanduser(files)) if local else files,
        "dataset_train_split": script_args.dataset_train_split,
        "dataset_test_split": script_args.dataset_test_split,
        "image_column": script_args.image_column,
        "question_column": script_args.question_column,
        "answer_column": script_args.answer_column,
    }


def offline_comparison(model, processor, scans: int, judge=None) -> dict[str, float]:
    """Accuracy of `model` on the first `scans` held-out test scans: the new skill clean and under a 2% attack, the
    round trip (caption -> own image -> own answer) judged by the digit judge (`judge`, built when `None`), and the
    pretrained digit skill."""
    from trl_unigame.digit_judge import DigitJudge
    from trl_unigame.evaluation import UniGameEvaluator
    from trl_unigame.testing import digits_vqa_dataset

    if not isinstance(judge, DigitJudge):
        judge = DigitJudge()

    common = dict(batch_size=64, show_progress=False, attack_budget="relative", attack_eps=[0.02])
    after = UniGameEvaluator(
        model,
        processor,
        consistency=True,
        judge=judge,
        generation_guidance_scale=3.0,
        generation_temperature=0.7,
        **common,
    ).evaluate(digits_vqa_dataset("test", skills=("after",), seed=1, max_scans=scans))
    digit = UniGameEvaluator(model, processor, **common).evaluate(
        digits_vqa_dataset("test", skills=("digit",), seed=1, max_scans=scans)
    )
    return {
        "next digit: clean": after["clean/vqa_accuracy"],
        "next digit: under attack (2%)": after["attack_rel0.02/vqa_accuracy"],
        "next digit: round trip": after["consistency/vqa_accuracy"],
        "generation judged right": after["consistency/judge_score"],
        OLD_SKILL_ROW: digit["clean/vqa_accuracy"],
    }


# The before/after table's row of the pretrained skill, which fine-tuning should keep.
OLD_SKILL_ROW = "this digit (pretrained): clean"


def plain_fine_tuning(script_args, training_args, model_args) -> dict[str, float]:
    """`--compare_sft`: the same run with the game switched off (no perturber, no mining, no buffer, no perturbed
    tokens: the Trainer's own step on the same loss, data and steps, as the effect benchmark's `sft`), evaluated as the
    game's run is; nothing of it is saved."""
    import copy
    import tempfile

    args = copy.copy(training_args)
    args.adversarial_weight, args.mining_interval, args.buffer_weight, args.perturbed_weight = 0.0, 0, 0.0, 0.0
    args.generation_check_interval, args.save_strategy, args.push_to_hub = 0, "no", False
    args.report_to, args.resume_from_checkpoint = [], None
    model, processor, train, _, _ = load_model_and_data(script_args, args, model_args)
    with tempfile.TemporaryDirectory() as folder:
        args.output_dir = folder
        trainer = UniGameTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=processor,
            peft_config=get_peft_config(model_args),
        )
        trainer.train()
        with full_parameters(trainer.model_wrapped):
            return offline_comparison(trainer.model, processor, script_args.compare_scans)


def write_hard_sample_gallery(trainer, path: str, count: int = 8) -> None:
    """A PNG of the hardest buffer entries (real image beside decoded candidate, question, answer, prediction, H and
    s, with a legend), PIL only."""
    from trl_unigame.gallery import hard_sample_gallery
    from trl_unigame.interfaces import to_pil_images

    entries = trainer.buffer.entries[:count]
    if not entries:
        return
    images = to_pil_images([e.image.float() / 255 for e in entries])
    predictions = trainer.interface.answer(trainer.model, images, [e.row["question"] for e in entries])
    args = trainer.args
    hard_sample_gallery(
        entries,
        predictions,
        consistency_weight=args.consistency_weight,
        consistency_threshold=args.consistency_threshold,
    ).save(path)


def quantization_kwargs(model_args, model_path: str) -> dict:
    """`from_pretrained` keyword arguments for `--load_in_4bit` / `--load_in_8bit` (bitsandbytes), or `{}`: the model
    family's small projections and VQ model stay out of the quantization (see docs/models.md), and on a GPU each
    process loads onto its own device."""
    quantization_config = get_quantization_config(model_args)
    if quantization_config is None:
        return {}
    from accelerate import PartialState

    from trl_unigame.interfaces import quantization_skip_modules_for

    quantization_config.llm_int8_skip_modules = quantization_skip_modules_for(
        model_path, revision=model_args.model_revision
    )
    device_map = {"": PartialState().local_process_index} if torch.cuda.is_available() else None
    return {"quantization_config": quantization_config, "device_map": device_map}


def load_dataset_rows(script_args, prompt_column: str):
    """The rows of `--dataset_name` (with `--dataset_data_files`), mapped to the trainer's columns: `(train,
    evaluation)`, `evaluation` being the `--dataset_test_split` split when there is one, else `None`."""
    from datasets import load_dataset

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, data_files=script_args.dataset_data_files
    )
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"Split {script_args.dataset_train_split!r} not found; the dataset has {list(dataset)}. "
            "Choose one with --dataset_train_split."
        )
    train = dataset[script_args.dataset_train_split]
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    columns = dict(
        image_column=script_args.image_column,
        question_column=script_args.question_column,
        answer_column=script_args.answer_column,
        prompt_column=prompt_column,
    )
    train = to_vqa_format(train, **columns)
    evaluation = None
    if script_args.dataset_test_split in dataset:
        evaluation = to_vqa_format(dataset[script_args.dataset_test_split], **columns)
    return train, evaluation


def consistency_scorer_for(training_args):
    """The scorer of mined candidates the script builds itself: the digit judge for `--consistency_model digit_judge`
    (then `consistency_model` becomes `None`: no CLIP is loaded); `None` otherwise (the trainer loads the CLIP model
    named by `--consistency_model`, or none)."""
    if training_args.consistency_model != DIGIT_JUDGE:
        return None
    from trl_unigame.digit_judge import DigitJudge

    training_args.consistency_model = None
    return DigitJudge()


def load_model_and_data(script_args, training_args, model_args):
    """The model, its processor, the training and evaluation rows, and the consistency scorer (`None`: the trainer
    loads the one `--consistency_model` names). The rows load first, so a bad dataset stops the run before the model
    loads."""
    evaluation = None
    if script_args.dataset_name is not None:
        train, evaluation = load_dataset_rows(script_args, training_args.prompt_column)
        if training_args.eval_strategy == "no":
            evaluation = None
    if model_args.model_name_or_path is None:  # the shipped tiny digits Janus
        from trl_unigame.testing import digits_vqa_dataset, pretrained_tiny_janus, pretrained_tiny_janus_path

        if script_args.dataset_name is None:
            # The new skill mixed with a pretrained one, so fine-tuning keeps what the model knew.
            train = digits_vqa_dataset("train", skills=DIGITS_SKILLS, seed=0).shuffle(seed=training_args.seed)
            if script_args.max_train_samples:
                train = train.select(range(min(script_args.max_train_samples, len(train))))
        # Every layer the shipped model quantizes is at least 64 wide, as bitsandbytes' CPU kernels need.
        model, processor = pretrained_tiny_janus(**quantization_kwargs(model_args, pretrained_tiny_janus_path()))
        return model, processor, train, evaluation, consistency_scorer_for(training_args)

    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name (a Hub id, or a builder such as `parquet` with --dataset_data_files).")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        **quantization_kwargs(model_args, model_args.model_name_or_path),
    )
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model, processor, train, evaluation, consistency_scorer_for(training_args)


def main(script_args, training_args, model_args):
    model, processor, train, evaluation, scorer = load_model_and_data(script_args, training_args, model_args)
    offline = model_args.model_name_or_path is None
    # Every process evaluates: under several processes the evaluator shares the scans out and gathers the answers, so
    # a call on the main process alone would wait on a collective the others never join. The table is the built-in
    # digits' (a user's rows have no skill it could name).
    compare = offline and script_args.dataset_name is None and script_args.compare_scans > 0
    # Under DeepSpeed ZeRO-3 with `zero3_init_flag`, the model was partitioned as it loaded: gathered here.
    before = None
    if compare:
        with full_parameters(model):
            before = offline_comparison(model, processor, script_args.compare_scans, scorer)
    callbacks = []
    if script_args.picture_steps:
        from trl_unigame.callbacks import HardSamplePicturesCallback

        callbacks.append(HardSamplePicturesCallback(every_n_steps=script_args.picture_steps))
    trainer = UniGameTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
        consistency_scorer=scorer,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, TRAINING_DATA_FILE), "w") as f:
            json.dump(training_data_record(script_args, training_args), f, indent=2)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    # Under FSDP2 or ZeRO-3 the evaluation and the gallery's answers need the whole parameters: every process gathers
    # them (a no-op without sharding), then each answers its share of the scans, and the main process draws the
    # gallery.
    after = sft = None
    if compare or offline:
        with full_parameters(trainer.model_wrapped):
            after = (
                offline_comparison(trainer.model, processor, script_args.compare_scans, scorer) if compare else None
            )
            if offline and trainer.is_world_process_zero():
                write_hard_sample_gallery(
                    trainer, os.path.join(os.path.abspath(training_args.output_dir), "hard_samples.png")
                )
    if compare and script_args.compare_sft:  # after the game's evaluation, whose sampling it leaves as it was
        sft = plain_fine_tuning(script_args, training_args, model_args)
    if trainer.is_world_process_zero():
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)  # writes the model card too
        else:
            trainer.create_model_card(dataset_name=script_args.dataset_name)
        out = os.path.abspath(training_args.output_dir)
        if before is not None:
            print(f"\nAccuracy on {script_args.compare_scans} held-out test scans, before and after training:\n")
            columns = [before, after] + ([sft] if sft else [])
            header = "| | before training | after UniGame |" + (" after plain fine-tuning |" if sft else "")
            print(header + "\n|---|---|---|" + ("---|" if sft else ""))
            for key in before:
                print(f"| {key} | " + " | ".join(f"{100 * c[key]:.1f}%" for c in columns) + " |")
            drop = 100 * (before[OLD_SKILL_ROW] - after[OLD_SKILL_ROW])
            if drop > 0:
                sft_drop = (
                    f" (plain fine-tuning: {100 * (before[OLD_SKILL_ROW] - sft[OLD_SKILL_ROW]):.1f})" if sft else ""
                )
                hint = "" if sft else "; --compare_sft trains the same steps without the game, for comparison"
                print(
                    f"\nThe pretrained skill lost {drop:.1f} points{sft_drop}: a new skill costs some of an old one"
                    f"{hint}."
                )
            print(f"\nHard samples the game found: {out}/hard_samples.png")
        elif os.path.isfile(os.path.join(out, "hard_samples.png")):
            print(f"\nHard samples the game found: {out}/hard_samples.png")
        from textwrap import indent

        from peft import PeftModel

        from trl_unigame.interfaces import unwrap_model
        from trl_unigame.model_card import base_model_reference, load_snippet

        adapter = isinstance(trainer.model, PeftModel)
        saved = "the LoRA adapter" if adapter else "the full model"
        # The same code as the model card's: the base model by what actually loads it (the shipped model's function).
        base_code = base_model_reference(getattr(unwrap_model(trainer.model).config, "_name_or_path", None))[1]
        print(
            f"\nSaved {saved}, the perturber ({out}/perturber) and the processor to {out}.\n"
            "Load them with:\n\n" + indent(load_snippet(out, base_code, adapter=adapter), "    ") + "\n"
        )
        if adapter:
            model_option = "" if offline else f" --model_name_or_path {model_args.model_name_or_path}"
            print(
                "Evaluate it on what it trained on (recorded in "
                f"{TRAINING_DATA_FILE}):\n\n    python examples/evaluate_janus.py{model_option} --adapters {out}\n"
            )
    return trainer


def make_parser():
    parser = TrlParser(
        (UniGameScriptArguments, UniGameConfig, ModelConfig),
        description=(
            "UniGame post-training. Without --model_name_or_path the offline default runs, and its settings differ "
            "from the defaults listed below: "
            + " ".join(offline_default_arguments("unigame-janus-tiny"))
            + ". Options given on the command line replace the offline default's one by one."
        ),
    )
    return show_offline_defaults(parser, offline_default_arguments("unigame-janus-tiny"))


def show_offline_defaults(parser, default_argv: list[str]):
    """Adds to the `--help` line of each option the offline default sets the value it runs with there, so that the
    help shows what a run without `--model_name_or_path` uses, beside the option's own default."""
    values = {_option_name(group[0]): " ".join(group[1:]) or "true" for group in _options(default_argv)}
    for action in parser._actions:  # argparse keeps no public list of its options
        if action.dest in values and action.help is not None:
            value = values[action.dest].replace("%", "%%")
            action.help = f"{action.help} Without --model_name_or_path: {value}."
    for action in parser._actions:
        if action.dest in USER_MODEL_GAME and action.help is not None:
            action.help = f"{action.help} With a model of your own: {USER_MODEL_GAME[action.dest]}."
    return parser


def effective_settings(argv: list[str], training_args, model_args, script_args=None) -> str:
    """The settings the offline default runs with after the command line's options: one line, printed at start."""
    names = {_option_name(group[0]) for group in _options(offline_default_arguments("x") + list(argv))}
    values = []
    for name in sorted(names - {"config"}):
        for source in (training_args, model_args, script_args):
            if source is not None and hasattr(source, name):
                values.append(f"{name}={getattr(source, name)}")
                break
    data = "its digits" if script_args is None or script_args.dataset_name is None else "your dataset"
    return f"Offline default (the shipped tiny digits Janus on {data}): " + ", ".join(values)


def _options(argv: list[str]) -> list[list[str]]:
    """Splits a command line into its options, each `--name` with the values that follow it."""
    groups = []
    for token in argv:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def _option_name(option: str) -> str:
    return option[2:].split("=", 1)[0].replace("-", "_")


def given_options(argv: list[str]) -> set[str]:
    """The names of the options set on the command line, and of the keys of its `--config` YAML file."""
    options = _options(argv)
    given = {_option_name(group[0]) for group in options if group[0].startswith("--")}
    for group in options:
        if _option_name(group[0]) == "config":  # keys set in the YAML file count as given too
            import yaml

            path = group[1] if len(group) > 1 else group[0].split("=", 1)[1]
            with open(path) as f:
                given |= set(yaml.safe_load(f) or {})
    return given


def with_defaults(argv: list[str], default_argv: list[str], given: set[str]) -> list[str]:
    """`argv` after the default options it does not set: each option given replaces just its own default."""
    kept = [part for group in _options(default_argv) if _option_name(group[0]) not in given for part in group]
    return kept + list(argv)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def launcher_options(given: set[str]) -> list[str]:
    """Options implied by the launcher and not set by the user: an accelerate FSDP launch on the CPU (such as
    examples/accelerate_configs/fsdp_cpu.yaml, `use_cpu: true`) is `--use_cpu true`, with which the UniGame trainer
    shards on the CPU. Accelerate passes `ACCELERATE_USE_FSDP` to the processes it launches, but `use_cpu` only to a
    single one (`ACCELERATE_USE_CPU`): several processes read it from the machine having no accelerator."""
    if "use_cpu" in given or not _flag("ACCELERATE_USE_FSDP"):
        return []
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if _flag("ACCELERATE_USE_CPU") or not accelerator:
        return ["--use_cpu", "true"]
    return []


def parse_arguments(argv: list[str]):
    """Parses the command line. Without a model (`--model_name_or_path`, on the command line or in `--config`), the
    offline default's settings are the base, and each option given replaces just its own setting."""
    parser = make_parser()
    given = given_options(argv)
    argv = list(argv) + launcher_options(given)
    if "-h" in argv or "--help" in argv:
        parser.parse_args_and_config(args=argv)  # prints every option and exits
    model_name_or_path = _model_name_or_path(argv)
    if model_name_or_path is not None:
        if not _is_shipped_model(model_name_or_path):
            return parser.parse_args_and_config(args=with_defaults(argv, user_model_default_arguments(), given))
        # The shipped model's folder named on the command line: the run it would be without the option, whose
        # settings are sized to that model.
        argv = [part for group in _options(argv) if _option_name(group[0]) != "model_name_or_path" for part in group]
    return parser.parse_args_and_config(args=with_defaults(argv, offline_default_arguments(), given))


def _model_name_or_path(argv: list[str]) -> str | None:
    """The model named on the command line or in its `--config` file, read alone: the full parse checks the options
    against each other, so it runs once the defaults they go with are known (an option that needs another one the
    defaults set, such as `--generation_loss_targets anchors` with the offline default's generation loss, is valid)."""
    model_args, _ = TrlParser((ModelConfig,)).parse_args_and_config(args=list(argv), return_remaining_strings=True)
    return model_args.model_name_or_path


def _is_shipped_model(name: str) -> bool:
    from trl_unigame.testing import pretrained_tiny_janus_path

    path = os.path.expanduser(name)
    return os.path.isdir(path) and os.path.samefile(path, pretrained_tiny_janus_path())


class UsageError(ValueError):
    """A command line that cannot run, found before anything is loaded; its message says what to change."""


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (offline mode, or no connection to its host), or `None` when it can. Behind a
    proxy (`HTTPS_PROXY`) the connection is not probed."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from trl_unigame.consistency import hub_offline

    if hub_offline():
        return "the Hub is off (HF_HUB_OFFLINE=1)"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as error:
        return f"{url.hostname} cannot be reached ({error.strerror or error})"
    return None


def _cached(repo_id: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def _looks_like_path(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or os.path.isabs(name):
        return True
    parent = os.path.dirname(name)
    if parent and os.path.isdir(os.path.expanduser(parent)):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _unwritable(folder: str) -> str | None:
    """Why nothing can be written to `folder` (created when missing), or `None`: a folder is made and removed in its
    nearest existing parent, which nothing else is left in."""
    import tempfile

    path = os.path.abspath(os.path.expanduser(folder))
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as error:
        return f"{parent}: {error.strerror or error}"
    return None


def check_arguments(script_args, training_args, model_args) -> None:
    """Refuses, before anything is loaded, a command line that would fail only after minutes of work.

    Raises:
        UsageError: one line naming the option and what to give instead, for `--max_steps 0`, an `--output_dir` that
            cannot be written, a `--model_name_or_path` folder that does not exist (or a Hub id while the Hub cannot
            be reached and the model is not in the local cache), `--push_to_hub` while the Hub cannot be reached, a
            `--consistency_model` Hub id in that case too, and a model with no `--dataset_name`.
    """
    if training_args.max_steps == 0:
        raise UsageError(
            "--max_steps 0 trains nothing: give --max_steps N with N >= 1 (or leave it out and set --num_train_epochs)."
        )
    reason = _unwritable(training_args.output_dir)
    if reason is not None:
        raise UsageError(
            f"--output_dir {training_args.output_dir} cannot be written ({reason}): choose a folder you can write "
            "to, e.g. --output_dir ~/unigame-run."
        )
    name = model_args.model_name_or_path
    offline = None  # probed once, when a Hub model or an upload needs it
    if name is not None and not os.path.isdir(os.path.expanduser(name)):
        if _looks_like_path(name):
            raise UsageError(
                f"--model_name_or_path {name}: the folder does not exist. Give the folder of a saved model, or a Hub id "
                "such as deepseek-community/Janus-Pro-1B; leave it out to train the shipped tiny digits Janus."
            )
        offline = hub_unreachable()
        if offline and not _cached(name, model_args.model_revision):
            raise UsageError(
                f"--model_name_or_path {name} is not a local folder, and {offline} with no copy of it in the local "
                "cache: give a local folder, or download it while online (`hf download` fills the cache)."
            )
    if name is not None and script_args.dataset_name is None:
        raise UsageError(
            "--model_name_or_path needs --dataset_name (a Hub id, or a builder such as `imagefolder` or `parquet` with "
            "--dataset_data_files)."
        )
    scorer = training_args.consistency_model
    mining = training_args.mining_interval or training_args.generation_check_interval
    if scorer not in (None, DIGIT_JUDGE) and mining and not os.path.isdir(os.path.expanduser(scorer)):
        offline = offline if offline is not None else hub_unreachable()
        if offline and not _cached(scorer):
            raise UsageError(
                f"--consistency_model {scorer} (the CLIP model that scores mined candidates) is not a local folder, "
                f"and {offline} with no copy of it in the local cache: give a local CLIP folder, --consistency_model "
                f"{DIGIT_JUDGE} (the shipped tiny model's judge), or --consistency_model none (no filter)."
            )
    if training_args.push_to_hub:
        offline = offline if offline is not None else hub_unreachable()
        if offline:
            raise UsageError(
                f"--push_to_hub needs the Hub, but {offline}: train without --push_to_hub and upload "
                f"{training_args.output_dir} later (`hf upload <repo id> {training_args.output_dir}`)."
            )


def set_cpu_threads() -> int:
    """Sets torch's CPU threads for this process and returns them: `OMP_NUM_THREADS` when it is set (`accelerate
    launch` sets it), else the cores this process may use shared among the processes of this run on the machine
    (`LOCAL_WORLD_SIZE`), less the cores other work keeps busy (the 1-minute load average), at least 1. Threads that
    outnumber the free cores spin and wait on each other: beside one busy process on 2 cores, a step takes several
    times longer with 2 threads than with 1."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    threads = max(1, min(cores // local_processes, cores - busy))
    torch.set_num_threads(threads)
    return threads


def run(argv: list[str]):
    """The script's entry point: parses `argv`, refuses a bad command line in one line (printed by the first process
    only) and exits with status 2, else trains."""
    try:
        arguments = parse_arguments(argv)
        check_arguments(*arguments)
    except UsageError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    set_cpu_threads()
    script_args, training_args, model_args = arguments
    if model_args.model_name_or_path is None and training_args.process_index == 0:
        print(effective_settings(argv, training_args, model_args, script_args), flush=True)
    return main(*arguments)


def leave_process_group() -> None:
    """Every process leaves the process group together, once the main one has written what it writes: a group torn
    down at interpreter exit while another process still works can abort a process whose work is done (exit -6)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1:])
    leave_process_group()
