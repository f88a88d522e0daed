# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Evaluation of Janus / Janus-Pro and its UniGame (or any LoRA) adapters: VQA accuracy on clean images, under a
white-box PGD attack at the shared visual-token interface, under a trained perturber, on corrupted images, and on the
model's own generated images (round-trip consistency); and the reverse consistency (real image -> the model's own
caption -> its own drawing of it -> similarity to the real image).

With no arguments, evaluates the tiny Janus pretrained on real digit scans (shipped in the package) on 120 held-out
test scans ("What digit is this?"; shifted and corrupted scans included), on a CPU, in seconds, and writes
`unigame-eval/results.json` (with `--adapters`: `evaluation/results.json` inside the last adapter's folder). The tiny model cannot caption in words of its own: its caption is its answers to "What
color is the digit?" and "What digit is this?" in the dataset's caption format ("a {0} {1}", e.g. "a red seven"), and
the digit judge compares its drawing with the real scan (same digit and colour):

```bash
python examples/evaluate_janus.py
```

Without `--model_name_or_path`, the settings of that run are the starting point and each option given replaces only
its own setting: `--dataset_name imagefolder --dataset_data_files 'pngs/*'` evaluates the digits model on those
images with every condition, `--attack_eps 0.1` changes only the attack.

An adapter written by `train_janus.py` is evaluated on what it was trained on, which the run recorded in its
`training_data.json`: `--adapters unigame-janus-tiny` asks the new skill ("What digit is after this?") and the
pretrained one, each apart; an adapter trained on your rows is evaluated on that dataset.

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
    --output_dir janus-pro-eval

# a YAML file with the same keys works with --config
```
"""

import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field

import torch
from accelerate import PartialState
from trl import TrlParser

from trl_unigame.data import to_vqa_format
from trl_unigame.digits import SKILL_QUESTIONS
from trl_unigame.evaluation import DEFAULT_ATTACK_EPS, DEFAULT_CAPTION_QUESTION, UniGameEvaluator, reference_answers
from trl_unigame.model_card import GRADIENT_CHECKPOINTING_WARNING


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_janus import (  # noqa: E402  (the same command-line rule and run record as the training script)
    TRAINING_DATA_FILE,
    given_options,
    leave_process_group,
    set_cpu_threads,
    show_offline_defaults,
    with_defaults,
)


# Columns kept beside `to_vqa_format`'s image/question/answer: all annotators' answers and the group keys.
EXTRA_COLUMNS = ("answers", "group_id", "question_id", "image_id")
# The script's arguments that `UniGameEvaluator` takes under the same name. Not `image_column`/`question_column`:
# those name the raw dataset's columns, which `to_vqa_format` renames.
EVALUATOR_ARGUMENTS = (
    *("batch_size", "max_new_tokens", "attack_eps", "attack_budget", "attack_steps", "perturber", "corruptions"),
    *("consistency", "generation_guidance_scale", "generation_temperature", "caption_column", "seed"),
    *("reverse_consistency", "caption_question", "caption_template", "caption_max_new_tokens"),
)


@dataclass
class EvaluationScriptArguments:
    r"""
    Arguments of the evaluation script.

    Args:
        model_name_or_path (`str`, *optional*): Base model (Hub id or folder); when not given, the tiny Janus pretrained
            on digit scans, with the offline default's settings for every option not given.
        adapters (`list[str]`, *optional*): LoRA adapter folders (or Hub ids) trained from the base model; each is
            evaluated as its own row, after the base model.
        perturber (`str`, *optional*): A trained perturber (folder or Hub id), e.g. a UniGame output's `perturber/`.
        dtype (`str`, *optional*, defaults to `"auto"`): `auto`, `float32`, `bfloat16` or `float16`.
        dataset_name (`str`, *optional*): Hub dataset id, or a builder (`parquet`, `json`, `imagefolder`) with
            `--dataset_data_files`; without it (and without a model), 120 held-out digit scans.
        dataset_config (`str`, *optional*): Dataset configuration name.
        dataset_split (`str`, *optional*, defaults to `"test"`): Split evaluated; when not given and the dataset has a
            single split (e.g. `imagefolder` with one glob), that split.
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
        reverse_consistency (`bool`, *optional*, defaults to `False`): The other way round: real image -> own caption
            -> own drawing -> similarity to the real image (needs `image_similarity`).
        image_similarity (`str`, *optional*): How the reverse consistency compares the drawing with the real image:
            `digit_judge` (same digit and colour, the digits task) or a CLIP model (Hub id or folder: image-image
            cosine).
        caption_question (`list[str]`, *optional*, defaults to `["Describe the image in one sentence."]`): The
            question(s) whose answers make the model's caption.
        caption_template (`str`, *optional*): `str.format` template of the caption from the answers (`{0}`, `{1}`,
            ...); without it the answers are joined by spaces.
        caption_max_new_tokens (`int`, *optional*, defaults to `32`): Longest answer to a caption question.
        generation_guidance_scale (`float`, *optional*): Guidance of the round trip's generation; the model's own
            (`generation_config.guidance_scale`, else 5.0) when not given.
        generation_temperature (`float`, *optional*): Temperature of the round trip's generation; the model's own
            (`generation_config.temperature`, else 1.0) when not given.
        seed (`int`, *optional*, defaults to `0`): Seed of the corruptions and of image generation.
        output_dir (`str`, *optional*): Folder of the results (created when missing). By default `evaluation/` inside
            the folder of the last adapter of `adapters` (a local one), beside what was evaluated; `unigame-eval` in the
            working folder when no adapter is evaluated.
        output_file (`str`, *optional*, defaults to `"results.json"`): Results and config, as JSON; a relative path is
            inside `output_dir`, an absolute one is used as it is.
        predictions_file (`str`, *optional*): Also write the per-row answers and scores (JSON lines); relative paths
            are inside `output_dir`.
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
    reverse_consistency: bool = field(
        default=False, metadata={"help": "Real image -> own caption -> own drawing -> similarity to the real image."}
    )
    image_similarity: str | None = field(
        default=None, metadata={"help": "digit_judge, or a CLIP model (Hub id or folder) for image-image cosine."}
    )
    caption_question: list[str] = field(
        default_factory=lambda: [DEFAULT_CAPTION_QUESTION],
        metadata={"help": "Question(s) whose answers make the model's caption."},
    )
    caption_template: str | None = field(
        default=None, metadata={"help": "Caption from the answers, e.g. 'a {0} {1}' (None: joined by spaces)."}
    )
    caption_max_new_tokens: int = field(default=32, metadata={"help": "Longest answer to a caption question."})
    generation_guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance of the round trip's images (None: the model's)."}
    )
    generation_temperature: float | None = field(
        default=None, metadata={"help": "Temperature of the round trip's images (None: the model's)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the corruptions and of image generation."})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the results (default: evaluation/ inside the last adapter's folder; without an adapter, "
            "unigame-eval)."
        },
    )
    output_file: str = field(
        default="results.json", metadata={"help": "Results and config, as JSON (relative: inside output_dir)."}
    )
    predictions_file: str | None = field(
        default=None, metadata={"help": "Per-row answers and scores, JSON lines (relative: inside output_dir)."}
    )


def offline_default_arguments() -> list[str]:
    """The embedded default run: every condition on the pretrained tiny digits Janus, budgets relative to the token
    norm (2% and 5%), generation at the model's own guidance (3) and temperature (0.7). Its reverse consistency
    captions a scan in the dataset's caption format from the model's answers to the colour and digit questions (it
    was never taught to caption otherwise), and the digit judge compares its drawing with the scan."""
    return [
        *("--corruptions", "noise_3", "blur_3", "jpeg_3", "contrast_3", "--consistency", "true"),
        *("--reverse_consistency", "true", "--image_similarity", "digit_judge", "--caption_template", "a {0} {1}"),
        *("--caption_question", "What color is the digit?", "What digit is this?"),
        *("--attack_budget", "relative", "--attack_eps", "0.02", "0.05"),
        *("--generation_guidance_scale", "3.0", "--generation_temperature", "0.7"),
    ]


def load_model(args):
    """The base model and its processor: `--model_name_or_path`, or the pretrained tiny digits Janus."""
    if args.model_name_or_path is None:
        from trl_unigame.testing import pretrained_tiny_janus

        return pretrained_tiny_janus()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=dtype)
    return model, AutoProcessor.from_pretrained(args.model_name_or_path)


# Metric prefixes of the digits skills, by what each asks.
SKILL_NAMES = {"digit": "digit", "color": "color", "after": "next_digit", "even": "even"}
# The dataset options a training run records, in `TRAINING_DATA_FILE`.
RECORDED_OPTIONS = ("dataset_config", "dataset_data_files", "image_column", "question_column", "answer_column")


def training_data(adapters: list[str]) -> dict | None:
    """What the first adapter with a record was trained on: `train_janus.py` writes `training_data.json` to its
    output folder (a `checkpoint-*` folder reads its parent's); `None` when no adapter has one."""
    for path in adapters:
        for folder in (path, os.path.dirname(os.path.normpath(path))):
            record = os.path.join(folder, TRAINING_DATA_FILE)
            if folder and os.path.isfile(record):
                with open(record) as f:
                    return json.load(f)
    return None


def apply_training_data(args, given: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Points the evaluation at what the adapters were trained on, for each dataset option not given: the recorded
    dataset (its test split), or the digits skills. Returns the digits skills to evaluate, the adapters' new skills
    first and the pretrained one after it (its drop matters as much); `("digit",)` without a record."""
    record = training_data(args.adapters)
    if record is None or "dataset_name" in given:
        return ("digit",)
    if record.get("dataset_name") is None:
        if args.model_name_or_path is not None:
            return ("digit",)
        skills = list(record.get("new_skills", [])) + list(record.get("digits_skills", []))
        skills = tuple(dict.fromkeys(skills + ["digit"]))
        questions = ", ".join(f"{SKILL_NAMES.get(s, s)} ({SKILL_QUESTIONS[s]!r})" for s in skills)
        print(f"The adapters were trained on the digits' skills {skills}: evaluating each, {questions}.")
        return skills
    args.dataset_name = record["dataset_name"]
    for name in RECORDED_OPTIONS:
        if name not in given and record.get(name) is not None:
            setattr(args, name, record[name])
    if "dataset_split" not in given and record.get("dataset_test_split"):
        args.dataset_split = record["dataset_test_split"]
    print(
        f"Evaluating the dataset the adapters were trained on ({args.dataset_name}), as {TRAINING_DATA_FILE} records."
    )
    return ("digit",)


def load_data(args, given: frozenset[str] = frozenset(), skills: tuple[str, ...] = ("digit",)):
    """The rows evaluated: `--dataset_name` mapped by `to_vqa_format`, or (without a model) 120 scans of the digits
    test split, which no training saw, asked each of `skills`. `given` names the options set by the user."""
    if args.dataset_name is None:
        if args.model_name_or_path is not None:
            raise ValueError(
                "Pass --dataset_name (a Hub id, or a builder such as `parquet` with --dataset_data_files)."
            )
        from trl_unigame.testing import digits_vqa_dataset

        dataset = digits_vqa_dataset("test", skills=skills, seed=1, max_scans=120)
        if args.max_samples:
            dataset = dataset.select(range(min(args.max_samples, len(dataset))))
        return dataset
    from datasets import load_dataset

    splits = load_dataset(args.dataset_name, name=args.dataset_config, data_files=args.dataset_data_files)
    split = args.dataset_split
    if split not in splits and len(splits) == 1 and "dataset_split" not in given:
        split = next(iter(splits))  # e.g. `imagefolder` with one glob names its only split `train`
        print(
            f"Evaluating the dataset's only split, {split!r} (choose another with --dataset_split; with data a run "
            "trained on, these may be its training rows)."
        )
    if split not in splits:
        raise ValueError(
            f"Split {split!r} not found; the dataset has {list(splits)}. Choose one with --dataset_split."
        )
    raw = splits[split]
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
    if args.consistency and args.caption_column not in dataset.column_names and "consistency" not in given:
        # The round trip of the offline default needs captions; the user's rows may have none.
        print(f"No {args.caption_column!r} column: the round trip (--consistency) is skipped.")
        args.consistency = False
    return dataset


def load_model_and_data(args, given: frozenset[str] = frozenset()):
    skills = apply_training_data(args, given)
    dataset = load_data(args, given, skills)
    model, processor = load_model(args)
    # Under `accelerate launch` / `torchrun` this is each process's own device, and the evaluator shards the rows.
    return model.to(PartialState().device), processor, dataset


def load_image_similarity(args):
    """The reverse consistency's `(generated, real) -> scores`: the digit judge (`--image_similarity digit_judge`) or a
    CLIP model's image-image cosine (a Hub id or folder); `None` when `--reverse_consistency` is off."""
    if not args.reverse_consistency:
        return None
    if args.image_similarity is None:
        raise ValueError(
            "--reverse_consistency needs --image_similarity: `digit_judge` (the digits task) or a CLIP model (Hub id "
            "or folder, e.g. openai/clip-vit-base-patch16)."
        )
    if args.image_similarity == "digit_judge":
        from trl_unigame.digit_judge import DigitJudge

        return DigitJudge()
    from trl_unigame import CLIPConsistencyScorer

    return CLIPConsistencyScorer(args.image_similarity, device=PartialState().device)


def evaluate_models(args, model, processor, dataset) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Metrics of the base model and of each adapter, by model name; and the per-row predictions of all of them."""
    from peft import PeftModel

    predictions: list[dict] = []
    similarity = load_image_similarity(args)
    # Several digits skills are evaluated apart, each metric named by its skill (`next_digit/clean/vqa_accuracy`).
    skills = list(dict.fromkeys(dataset["skill"])) if "skill" in dataset.column_names else []
    if len(skills) > 1:
        parts = {SKILL_NAMES.get(s, s): dataset.filter(lambda x, s=s: x == s, input_columns="skill") for s in skills}
    else:
        parts = {None: dataset}

    def run(name, current):
        settings = {key: getattr(args, key) for key in EVALUATOR_ARGUMENTS}
        evaluator = UniGameEvaluator(current, processor, image_similarity=similarity, **settings)
        metrics = {}
        for skill, part in parts.items():
            values, rows = evaluator.evaluate(part, return_predictions=True)
            for row in rows:
                row["model"] = name
                if skill is not None:
                    row["skill"] = skill
            predictions.extend(rows)
            metrics.update({(f"{skill}/{key}" if skill else key): value for key, value in values.items()})
        return metrics

    results = {"base": run("base", model)}
    peft_model = None
    for index, path in enumerate(args.adapters):
        name = os.path.basename(os.path.normpath(path))
        if name in results:  # e.g. two runs' checkpoint-1000
            name = f"{name}-{index + 1}"
        adapter_name = f"adapter{index}"  # PEFT module names cannot hold the dots a folder name may have
        if peft_model is None:
            with warnings.catch_warnings():  # PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecates
                warnings.filterwarnings("ignore", GRADIENT_CHECKPOINTING_WARNING, FutureWarning)
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


#: The folder of the results when no adapter is evaluated and `--output_dir` is not given.
BASE_OUTPUT_DIR = "unigame-eval"


def default_output_dir(args) -> str:
    """The folder of the results when `--output_dir` is not given: `evaluation/` inside the last local adapter's
    folder (the results stay with what they measure, not in the working folder), else `unigame-eval`."""
    local = [path for path in args.adapters if os.path.isdir(path)]
    return os.path.join(local[-1], "evaluation") if local else BASE_OUTPUT_DIR


def output_path(args, path: str) -> str:
    """`path` inside `--output_dir` when relative; as it is when absolute."""
    return os.path.join(args.output_dir, path)


def main(args, given: frozenset[str] = frozenset()):
    # Several processes (`accelerate launch`, `torchrun`) join one process group: each answers a shard of the rows
    # and every process gets the whole set's results; the main process prints and writes them.
    state = PartialState(cpu=not torch.cuda.is_available())
    model, processor, dataset = load_model_and_data(args, given)
    results, predictions = evaluate_models(args, model, processor, dataset)
    if not state.is_main_process:
        return results
    table = markdown_table(results)
    print(table)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args)
    os.makedirs(args.output_dir, exist_ok=True)
    path = output_path(args, args.output_file)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"config": asdict(args), "num_rows": len(dataset), "results": results}, f, indent=2)
    print(f"\nResults of {len(dataset)} rows written to {os.path.abspath(path)}")
    if args.predictions_file:
        path = output_path(args, args.predictions_file)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
        print(f"Per-row predictions written to {os.path.abspath(path)}")
    return results


def make_parser():
    return show_offline_defaults(TrlParser((EvaluationScriptArguments,)), offline_default_arguments())


def parse_arguments(argv: list[str]) -> tuple[EvaluationScriptArguments, frozenset[str]]:
    """Parses the command line; returns the arguments and the names of the options the user set. Without a model
    (`--model_name_or_path`, on the command line or in `--config`), the offline default's settings are the base, and
    each option given replaces just its own setting."""
    parser = make_parser()
    given = given_options(argv)
    (args,) = parser.parse_args_and_config(args=argv)
    if args.model_name_or_path is not None:
        return args, frozenset(given)
    (args,) = parser.parse_args_and_config(args=with_defaults(argv, offline_default_arguments(), given))
    return args, frozenset(given)


if __name__ == "__main__":
    set_cpu_threads()  # `OMP_NUM_THREADS` when set, else the free cores shared among this machine's processes
    main(*parse_arguments(sys.argv[1:]))
    leave_process_group()
