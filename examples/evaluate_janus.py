# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Evaluation of Janus / Janus-Pro and its UniGame (or any LoRA) adapters: VQA accuracy on clean images, under a
white-box PGD attack at the shared visual-token interface, under a trained perturber, on corrupted images, and on the
model's own generated images (round-trip consistency).

With no arguments, evaluates the tiny Janus pretrained on real digit scans (shipped in the package) on 120 held-out
test scans ("What digit is this?"; shifted and corrupted scans included), on a CPU, in seconds:

```bash
python examples/evaluate_janus.py
```

`accelerate launch` (or `torchrun`) with several processes splits the rows between them; the main process writes the
results.

A base model and the adapters trained from it (one row per model and condition; the base model is a row too):

```bash
python examples/evaluate_janus.py \
    --model_name_or_path deepseek-community/Janus-Pro-1B --dtype bfloat16 \
    --adapters Janus-Pro-1B-SFT Janus-Pro-1B-UniGame \
    --perturber Janus-Pro-1B-UniGame/perturber \
    --dataset_name HuggingFaceM4/VQAv2 --dataset_split validation --max_samples 2000 \
    --attack_eps 0.02 0.05 --corruptions noise_3 blur_3 jpeg_3 contrast_3 \
    --output_file results.json

# a YAML file with the same keys works with --config
```
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from accelerate import PartialState
from trl import TrlParser

from trl_unigame.data import to_vqa_format
from trl_unigame.evaluation import DEFAULT_ATTACK_EPS, UniGameEvaluator, reference_answers


# Columns kept beside `to_vqa_format`'s image/question/answer: all annotators' answers and the group keys.
EXTRA_COLUMNS = ("answers", "group_id", "question_id", "image_id")
# The script's arguments that `UniGameEvaluator` takes under the same name. Not `image_column`/`question_column`:
# those name the raw dataset's columns, which `to_vqa_format` renames.
EVALUATOR_ARGUMENTS = (
    *("batch_size", "max_new_tokens", "attack_eps", "attack_budget", "attack_steps", "perturber", "corruptions"),
    *("consistency", "generation_guidance_scale", "generation_temperature", "caption_column", "seed"),
)


@dataclass
class EvaluationScriptArguments:
    r"""
    Arguments of the evaluation script.

    Args:
        model_name_or_path (`str`, *optional*): Base model (Hub id or folder); a tiny offline model when not given.
        adapters (`list[str]`, *optional*): LoRA adapter folders (or Hub ids) trained from the base model; each is
            evaluated as its own row, after the base model.
        perturber (`str`, *optional*): A trained perturber (folder or Hub id), e.g. a UniGame output's `perturber/`.
        dtype (`str`, *optional*, defaults to `"auto"`): `auto`, `float32`, `bfloat16` or `float16`.
        dataset_name (`str`, *optional*): Hub dataset id, or a builder (`parquet`, `json`, `imagefolder`) with
            `--dataset_data_files`.
        dataset_config (`str`, *optional*): Dataset configuration name.
        dataset_split (`str`, *optional*, defaults to `"test"`): Split evaluated.
        dataset_data_files (`str`, *optional*): Local data files.
        image_column, question_column, answer_column (`str`): As in `train_janus.py`; an `answers` list (VQAv2's
            annotators) is kept for the soft VQA accuracy.
        caption_column (`str`, *optional*, defaults to `"caption"`): Prompt of the round trip.
        max_samples (`int`, *optional*): Evaluate only the first rows.
        batch_size (`int`, *optional*, defaults to `32`): Rows answered together.
        max_new_tokens (`int`, *optional*, defaults to `10`): Longest answer.
        attack_eps (`list[float]`, *optional*, defaults to `[0.02]`): PGD budgets; none runs no attack.
        attack_budget (`str`, *optional*, defaults to `"absolute"`): `absolute` (per-token L2 norm) or `relative`
            (ratio to each token's norm).
        attack_steps (`int`, *optional*, defaults to `5`): PGD steps.
        corruptions (`list[str]`, *optional*): e.g. `noise_3 blur_3 jpeg_3 contrast_3` (`noise` alone: severities 1, 3
            and 5).
        consistency (`bool`, *optional*, defaults to `False`): Round trip caption -> own image -> own answer.
        generation_guidance_scale (`float`, *optional*, defaults to `5.0`): Guidance of the round trip's generation.
        generation_temperature (`float`, *optional*, defaults to `1.0`): Temperature of the round trip's generation.
        seed (`int`, *optional*, defaults to `0`): Seed of the corruptions and of image generation.
        output_file (`str`, *optional*, defaults to `"results.json"`): Where to write the results and the config.
        predictions_file (`str`, *optional*): Also write the per-row answers and scores (JSON lines).
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model; tiny offline if not given."})
    adapters: list[str] = field(default_factory=list, metadata={"help": "LoRA adapter folders, one row each."})
    perturber: str | None = field(default=None, metadata={"help": "Trained perturber folder or Hub id."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, or a builder with data files."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="test", metadata={"help": "Split evaluated."})
    dataset_data_files: str | None = field(default=None, metadata={"help": "Local data files to load."})
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    question_column: str = field(default="question", metadata={"help": "Column holding the question."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the answer (or `answers`)."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the round trip's prompt."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first rows."})
    batch_size: int = field(default=32, metadata={"help": "Rows answered together."})
    max_new_tokens: int = field(default=10, metadata={"help": "Longest answer."})
    attack_eps: list[float] = field(
        default_factory=lambda: [DEFAULT_ATTACK_EPS], metadata={"help": "PGD budgets (none: no attack)."}
    )
    attack_budget: str = field(default="absolute", metadata={"help": "absolute or relative."})
    attack_steps: int = field(default=5, metadata={"help": "PGD steps."})
    corruptions: list[str] = field(default_factory=list, metadata={"help": "e.g. noise_3 blur_3 jpeg_3 contrast_3."})
    consistency: bool = field(default=False, metadata={"help": "Round trip caption -> own image -> own answer."})
    generation_guidance_scale: float = field(default=5.0, metadata={"help": "Guidance of the round trip's images."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Temperature of the round trip's images."})
    seed: int = field(default=0, metadata={"help": "Seed of the corruptions and of image generation."})
    output_file: str = field(default="results.json", metadata={"help": "Results and config, as JSON."})
    predictions_file: str | None = field(default=None, metadata={"help": "Per-row answers and scores (JSON lines)."})


def offline_default_arguments() -> list[str]:
    """The embedded default run: every condition on the pretrained tiny digits Janus, budgets relative to the token
    norm (2% and 5%), generation at the model's own guidance (3) and temperature (0.7)."""
    return [
        *("--corruptions", "noise_3", "blur_3", "jpeg_3", "contrast_3", "--consistency", "true"),
        *("--attack_budget", "relative", "--attack_eps", "0.02", "0.05"),
        *("--generation_guidance_scale", "3.0", "--generation_temperature", "0.7"),
    ]


def offline_model_and_data():
    """The pretrained tiny digits Janus and 120 scans of its test split, which no training saw."""
    from trl_unigame.testing import digits_vqa_dataset, pretrained_tiny_janus

    model, processor = pretrained_tiny_janus()
    return model, processor, digits_vqa_dataset("test", skills=("digit",), seed=1, max_scans=120)


def load_model_and_data(args):
    if args.model_name_or_path is None:
        model, processor, dataset = offline_model_and_data()
    else:
        from datasets import load_dataset
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
        if args.dataset_name is None:
            raise ValueError(
                "Pass --dataset_name (a Hub id, or a builder such as `parquet` with --dataset_data_files)."
            )
        splits = load_dataset(args.dataset_name, name=args.dataset_config, data_files=args.dataset_data_files)
        if args.dataset_split not in splits:
            raise ValueError(
                f"Split {args.dataset_split!r} not found; the dataset has {list(splits)}. Choose one with "
                "--dataset_split."
            )
        raw = splits[args.dataset_split]
        if args.max_samples:
            raw = raw.select(range(min(args.max_samples, len(raw))))
        dataset = to_vqa_format(
            raw,
            image_column=args.image_column,
            question_column=args.question_column,
            answer_column=args.answer_column,
            prompt_column=args.caption_column,
        )
        for column in EXTRA_COLUMNS:
            if column in raw.column_names and column not in dataset.column_names:
                values = raw[column]
                dataset = dataset.add_column(
                    column, [reference_answers(v) for v in values] if column == "answers" else list(values)
                )
    if args.max_samples and len(dataset) > args.max_samples:
        dataset = dataset.select(range(args.max_samples))
    # Under `accelerate launch` / `torchrun` this is each process's own device, and the evaluator shards the rows.
    return model.to(PartialState().device), processor, dataset


def evaluate_models(args, model, processor, dataset) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Metrics of the base model and of each adapter, by model name; and the per-row predictions of all of them."""
    from peft import PeftModel

    predictions: list[dict] = []

    def run(name, current):
        evaluator = UniGameEvaluator(current, processor, **{key: getattr(args, key) for key in EVALUATOR_ARGUMENTS})
        metrics, rows = evaluator.evaluate(dataset, return_predictions=True)
        for row in rows:
            row["model"] = name
        predictions.extend(rows)
        return metrics

    results = {"base": run("base", model)}
    peft_model = None
    for index, path in enumerate(args.adapters):
        name = os.path.basename(os.path.normpath(path))
        if name in results:  # e.g. two runs' checkpoint-1000
            name = f"{name}-{index + 1}"
        adapter_name = f"adapter{index}"  # PEFT module names cannot hold the dots a folder name may have
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, path, adapter_name=adapter_name)
        else:
            peft_model.load_adapter(path, adapter_name=adapter_name)
            peft_model.set_adapter(adapter_name)
        results[name] = run(name, peft_model)
    return results, predictions


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """One row per model and condition, one column per metric."""
    rows, columns = [], []
    for model_name, metrics in results.items():
        conditions: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            condition, _, metric = key.rpartition("/")
            conditions.setdefault(condition, {})[metric] = value
            if metric not in columns:
                columns.append(metric)
        rows += [(model_name, condition, values) for condition, values in conditions.items()]
    lines = ["| model | condition | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for model_name, condition, values in rows:
        cells = [f"{values[c]:.4f}" if c in values else "" for c in columns]
        lines.append(f"| {model_name} | {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    # Several processes (`accelerate launch`, `torchrun`) join one process group: each answers a shard of the rows
    # and every process gets the whole set's results; the main process prints and writes them.
    state = PartialState(cpu=not torch.cuda.is_available())
    model, processor, dataset = load_model_and_data(args)
    results, predictions = evaluate_models(args, model, processor, dataset)
    if not state.is_main_process:
        return results
    table = markdown_table(results)
    print(table)
    with open(args.output_file, "w") as f:
        json.dump({"config": asdict(args), "num_rows": len(dataset), "results": results}, f, indent=2)
    if args.predictions_file:
        with open(args.predictions_file, "w") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
    return results


def make_parser():
    return TrlParser((EvaluationScriptArguments,))


if __name__ == "__main__":
    argv = sys.argv[1:] or offline_default_arguments()
    (script_args,) = make_parser().parse_args_and_config(args=argv)
    main(script_args)
