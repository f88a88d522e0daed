# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
UniGame self-adversarial post-training of Janus / Janus-Pro, or of any model family in docs/models.md (Emu3; LLaVA,
Qwen2-VL, ... in the embedding-only game): `--model_name_or_path` picks the family by itself.

With no arguments, fine-tunes the tiny Janus pretrained on real digit scans (shipped in the package) with UniGame on
a skill it never learned ("What digit is after this?"), offline on a CPU in a few minutes, and prints its accuracy
on held-out scans before and after (clean, under attack, round trip); any option replaces just that setting:

```bash
accelerate launch --config_file examples/accelerate_configs/single_process.yaml examples/train_janus.py
accelerate launch --config_file examples/accelerate_configs/single_process.yaml examples/train_janus.py \
    --max_steps 50 --output_dir quick-run
```

(`single_process.yaml` gives accelerate every value it would otherwise fill in and print; `--load_in_4bit` quantizes
the shipped model too.)

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

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_unigame import UniGameConfig, UniGameTrainer
from trl_unigame.data import to_vqa_format
from trl_unigame.game.sharding import full_parameters


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


def offline_default_arguments(output_dir: str = "unigame-janus-tiny") -> list[str]:
    """The embedded default run: the pretrained tiny digits Janus, its digits data, CPU-sized settings (the effect
    benchmark's UniGame settings, see docs/benchmarks.md); hard-sample galleries and curves every 100 steps."""
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


# The game on the tiny digits model (budgets relative to the token norm; the digit judge filters candidates).
OFFLINE_GAME = {
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


def offline_comparison(model, processor, scans: int, judge) -> dict[str, float]:
    """Accuracy of `model` on the first `scans` held-out test scans: the new skill clean and under a 2% attack, the
    round trip (caption -> own image -> own answer) judged by the digit judge, and the pretrained digit skill."""
    from trl_unigame.evaluation import UniGameEvaluator
    from trl_unigame.testing import digits_vqa_dataset

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
        "'after' clean": after["clean/vqa_accuracy"],
        "'after' under attack (2%)": after["attack_rel0.02/vqa_accuracy"],
        "'after' round trip": after["consistency/vqa_accuracy"],
        "generation judged right": after["consistency/judge_score"],
        "'digit' clean": digit["clean/vqa_accuracy"],
    }


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


def load_model_and_data(script_args, training_args, model_args):
    if model_args.model_name_or_path is None:  # embedded offline default
        from trl_unigame.testing import (
            DigitJudge,
            digits_vqa_dataset,
            pretrained_tiny_janus,
            pretrained_tiny_janus_path,
        )

        # Every layer the shipped model quantizes is at least 64 wide, as bitsandbytes' CPU kernels need.
        model, processor = pretrained_tiny_janus(**quantization_kwargs(model_args, pretrained_tiny_janus_path()))
        # The new skill mixed with a pretrained one, so fine-tuning keeps what the model knew.
        train = digits_vqa_dataset("train", skills=("after", "digit"), seed=0).shuffle(seed=training_args.seed)
        if script_args.max_train_samples:
            train = train.select(range(min(script_args.max_train_samples, len(train))))
        return model, processor, train, None, DigitJudge()

    from datasets import load_dataset

    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        **quantization_kwargs(model_args, model_args.model_name_or_path),
    )
    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    if script_args.dataset_name is None:
        raise ValueError("Pass --dataset_name (a Hub id, or a builder such as `parquet` with --dataset_data_files).")
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
        prompt_column=training_args.prompt_column,
    )
    train = to_vqa_format(train, **columns)
    evaluation = None
    if training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset:
        evaluation = to_vqa_format(dataset[script_args.dataset_test_split], **columns)
    # The trainer loads the CLIP scorer named by --consistency_model itself.
    return model, processor, train, evaluation, None


def main(script_args, training_args, model_args):
    model, processor, train, evaluation, scorer = load_model_and_data(script_args, training_args, model_args)
    offline = model_args.model_name_or_path is None
    # Every process evaluates: under several processes the evaluator shares the scans out and gathers the answers, so
    # a call on the main process alone would wait on a collective the others never join.
    compare = offline and script_args.compare_scans > 0
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
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    # Under FSDP2 or ZeRO-3 the evaluation and the gallery's answers need the whole parameters: every process gathers
    # them (a no-op without sharding), then each answers its share of the scans, and the main process draws the
    # gallery.
    after = None
    if compare or offline:
        with full_parameters(trainer.model_wrapped):
            after = (
                offline_comparison(trainer.model, processor, script_args.compare_scans, scorer) if compare else None
            )
            if offline and trainer.is_world_process_zero():
                write_hard_sample_gallery(
                    trainer, os.path.join(os.path.abspath(training_args.output_dir), "hard_samples.png")
                )
    if trainer.is_world_process_zero():
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)  # writes the model card too
        else:
            trainer.create_model_card(dataset_name=script_args.dataset_name)
        out = os.path.abspath(training_args.output_dir)
        if before is not None:
            print(f"\nAccuracy on {script_args.compare_scans} held-out test scans, before and after training:\n")
            print("| | before | after |\n|---|---|---|")
            for key in before:
                print(f"| {key} | {100 * before[key]:.1f}% | {100 * after[key]:.1f}% |")
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
    return trainer


def make_parser():
    return TrlParser(
        (UniGameScriptArguments, UniGameConfig, ModelConfig),
        description=(
            "UniGame post-training. Without --model_name_or_path the offline default runs, and its settings differ "
            "from the defaults listed below: "
            + " ".join(offline_default_arguments("unigame-janus-tiny"))
            + ". Options given on the command line replace the offline default's one by one."
        ),
    )


def effective_settings(argv: list[str], training_args, model_args) -> str:
    """The settings the offline default runs with after the command line's options: one line, printed at start."""
    names = {_option_name(group[0]) for group in _options(offline_default_arguments("x") + list(argv))}
    values = []
    for name in sorted(names - {"config"}):
        for source in (training_args, model_args):
            if hasattr(source, name):
                values.append(f"{name}={getattr(source, name)}")
                break
    return "Offline default (the tiny digits Janus, the digit judge as consistency scorer): " + ", ".join(values)


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


def parse_arguments(argv: list[str]):
    """Parses the command line. Without a model (`--model_name_or_path`, on the command line or in `--config`), the
    offline default's settings are the base, and each option given replaces just its own setting."""
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    if model_args.model_name_or_path is not None:
        return script_args, training_args, model_args
    return parser.parse_args_and_config(args=with_defaults(argv, offline_default_arguments(), given_options(argv)))


if __name__ == "__main__":
    arguments = parse_arguments(sys.argv[1:])
    if arguments[2].model_name_or_path is None and arguments[1].process_index == 0:
        print(effective_settings(sys.argv[1:], arguments[1], arguments[2]), flush=True)
    main(*arguments)
