"""The `unigame` model of lmms-eval (`trl_unigame.integrations.lmms_eval`).

The request -> answer logic is tested everywhere, on the pretrained digits Janus with a LoRA adapter saved here. The
tests marked `lmms_eval` run lmms-eval's own evaluator (`simple_evaluate`, and its CLI) offline on a local task over
a local dataset; they are skipped where lmms-eval is not installed (`pip install trl-unigame[lmms]`).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from trl_unigame.integrations.lmms_eval import (
    DEFAULT_MAX_NEW_TOKENS,
    MODEL_ID,
    TINY_DIGITS,
    UniGameLMM,
    clean_context,
    generation_settings,
    group_requests,
    load_unigame_model,
    parse_batch_size,
    request_image,
    truncate_at,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "unigame_digits_test"
NUM_SCANS = 24


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def rows():
    from trl_unigame.testing import digits_vqa_dataset

    return digits_vqa_dataset("test", skills=("digit",), seed=1, max_scans=NUM_SCANS)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter of the digits Janus with random (non-zero) weights: it changes some answers."""
    from peft import LoraConfig, get_peft_model

    from trl_unigame import get_interface
    from trl_unigame.testing import pretrained_tiny_janus

    torch.manual_seed(0)
    model, _ = pretrained_tiny_janus()
    targets = get_interface(model).lora_target_modules
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    folder = tmp_path_factory.mktemp("lmms") / "adapter"
    peft_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def perturber_dir(tmp_path_factory):
    """A perturber with a large relative budget (about 60% of each token's norm): it changes some answers."""
    from trl_unigame import Perturber
    from trl_unigame.testing import pretrained_tiny_janus

    torch.manual_seed(0)
    model, _ = pretrained_tiny_janus()
    perturber = Perturber.for_model(model, budget="relative", eps_max=0.7, eps_init=0.6, eps_min=0.5)
    folder = tmp_path_factory.mktemp("lmms") / "perturber"
    perturber.save_pretrained(folder)
    return str(folder)


def evaluator_results(rows, adapter=None, perturber=None):
    """`UniGameEvaluator`'s metrics and per-row answers of the digits Janus (with the adapter), batch 8."""
    from trl_unigame import UniGameEvaluator

    model, processor, _ = load_unigame_model(TINY_DIGITS, adapter=adapter)
    evaluator = UniGameEvaluator(
        model, processor, batch_size=8, max_new_tokens=10, attack_eps=None, perturber=perturber, show_progress=False
    )
    return evaluator.evaluate(rows, return_predictions=True)


def requests_for(rows, gen_kwargs):
    """lmms-eval's `generate_until` requests of `rows` (objects with its `Instance.args`)."""
    return [
        SimpleNamespace(args=(question, dict(gen_kwargs), lambda doc: [doc["image"]], i, TASK, "test"))
        for i, question in enumerate(rows["question"])
    ]


# ------------------------------------------------------------------------------------ request handling
def test_generation_settings_read_until_and_max_new_tokens():
    assert generation_settings({"until": "\n", "max_new_tokens": 5}, 16) == (["\n"], 5, False)
    assert generation_settings({}, 16) == ([], 16, False)
    assert generation_settings(None, 7) == ([], 7, False)
    assert generation_settings({"until": ["\n\n", ""], "temperature": 0}, 16) == (["\n\n"], 16, False)
    assert generation_settings({"temperature": 0.7}, 16)[2] is True
    assert generation_settings({"do_sample": "true"}, 16)[2] is True
    with pytest.raises(ValueError, match="until"):
        generation_settings({"until": 3}, 16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_settings({"max_new_tokens": 0}, 16)


def test_truncate_at_cuts_before_the_first_stop_string():
    assert truncate_at(" seven\n\nQuestion: x", ["\n\n"]) == "seven"
    assert truncate_at("a.b,c", [",", "."]) == "a"
    assert truncate_at("seven ", []) == "seven"


def test_group_requests_keeps_order_and_separates_tasks_and_settings():
    def args(task, gen_kwargs):
        return ("q", gen_kwargs, None, 0, task, "test")

    requests = [args("a", {"max_new_tokens": 4}), args("a", {"max_new_tokens": 4}), args("b", {}), args("a", {})]
    requests += [args("a", {"max_new_tokens": 4})] * 3
    assert group_requests(requests, batch_size=2) == [[0, 1], [4, 5], [6], [2], [3]]
    assert group_requests(requests, batch_size=8) == [[0, 1, 4, 5, 6], [2], [3]]


def test_request_image_wants_exactly_one_image(rows):
    image = rows[0]["image"]
    assert request_image([image], "t", 0).mode == "RGB"
    assert request_image(image, "t", 0).size == image.size
    for visuals in ([], None, [image, image], ["clip.mp4"]):
        with pytest.raises(ValueError, match="exactly one image"):
            request_image(visuals, "t", 3)


def test_clean_context_and_batch_size():
    assert clean_context("<image>\nWhat digit is this?", ["<image_placeholder>"]) == "What digit is this?"
    assert clean_context("<image_placeholder> What?", ["<image_placeholder>"]) == "What?"
    assert parse_batch_size("4") == 4 and parse_batch_size(None) == 1
    for bad in ("auto", "0", "auto:4"):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad)


def test_pyproject_registers_the_model_and_the_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    target = project["entry-points"]["lmms_eval.models"][MODEL_ID]
    module, attribute = target.split(":")
    assert module == "trl_unigame.integrations.lmms_eval" and attribute == "lmms_eval_manifest"
    assert any(req.startswith("lmms-eval") for req in project["optional-dependencies"]["lmms"])


# ------------------------------------------------------------------------------- the model, lmms-eval aside
def test_generate_until_gives_the_interfaces_greedy_answers_with_the_adapter(rows, adapter_dir):
    """The model (base + adapter) answers each request as the interface answers the row; `until` cuts the answers
    and `max_new_tokens` comes from the request."""
    from peft import PeftModel

    from trl_unigame import get_interface

    lmm = UniGameLMM(pretrained=TINY_DIGITS, adapter=adapter_dir, device="cpu", batch_size="5")
    assert isinstance(lmm.model, PeftModel) and lmm.batch_size == 5 and lmm.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    lmm.task_dict = {TASK: {"test": rows}}
    answers = lmm.generate_until(requests_for(rows, {"max_new_tokens": 10, "until": ["\n\n"]}))

    interface = get_interface(lmm.model, lmm.processor)
    images = [image.convert("RGB") for image in rows["image"]]
    expected = interface.answer(lmm.model, images, list(rows["question"]), max_new_tokens=10)
    assert answers == [a.strip() for a in expected]
    base_answers = UniGameLMM(pretrained=TINY_DIGITS, device="cpu", batch_size=8)
    base_answers.task_dict = lmm.task_dict
    base = base_answers.generate_until(requests_for(rows, {"max_new_tokens": 10}))
    assert base != answers  # the adapter is applied

    # A stop string present in every answer cuts them; one token is the shortest answer.
    assert lmm.generate_until(requests_for(rows, {"max_new_tokens": 10, "until": ["e"]})) == [
        a.split("e")[0].strip() for a in answers
    ]
    one_token = lmm.generate_until(requests_for(rows[:3], {"max_new_tokens": 1}))
    assert all(len(lmm.processor.tokenizer(a, add_special_tokens=False).input_ids) <= 1 for a in one_token)


def test_generate_until_with_a_perturber_matches_the_evaluator(rows, perturber_dir):
    lmm = UniGameLMM(pretrained=TINY_DIGITS, perturber=perturber_dir, device="cpu", batch_size=8)
    assert lmm.perturber.is_attached
    lmm.task_dict = {TASK: {"test": rows}}
    answers = lmm.generate_until(requests_for(rows, {"max_new_tokens": 10}))
    _, predictions = evaluator_results(rows, perturber=perturber_dir)
    assert answers == [row["perturber"] for row in predictions]
    assert answers != [row["clean"] for row in predictions]  # the perturber acts


def test_unsupported_requests_are_clear_errors(rows):
    lmm = UniGameLMM(pretrained=TINY_DIGITS, device="cpu")
    with pytest.raises(NotImplementedError, match="generate_until"):
        lmm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        lmm.generate_until_multi_round([])
    lmm.task_dict = {TASK: {"test": rows}}
    text_only = [SimpleNamespace(args=("Hi", {}, lambda doc: [], 0, TASK, "test"))]
    with pytest.raises(ValueError, match="exactly one image"):
        lmm.generate_until(text_only)
    with pytest.raises(ValueError, match="dtype"):
        UniGameLMM(pretrained=TINY_DIGITS, dtype="float12")


def test_a_gradient_reading_perturber_is_refused(tmp_path):
    from trl_unigame import Perturber
    from trl_unigame.testing import pretrained_tiny_janus

    model, _ = pretrained_tiny_janus()
    Perturber.for_model(model, inputs="features_and_gradient").save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="gradient"):
        UniGameLMM(pretrained=TINY_DIGITS, perturber=str(tmp_path / "p"))


# ----------------------------------------------------------------------------- lmms-eval's own evaluator
def write_task(folder, rows) -> str:
    """A local lmms-eval task over `rows` saved with `save_to_disk`: exact match of greedy answers (one reference
    each, so `UniGameEvaluator`'s VQA accuracy is exact match too)."""
    from datasets import DatasetDict

    data = os.path.join(folder, "data")
    DatasetDict({"test": rows}).save_to_disk(data)
    tasks = os.path.join(folder, "tasks")
    os.makedirs(tasks)
    with open(os.path.join(tasks, f"{TASK}.yaml"), "w") as f:
        f.write(
            f"task: {TASK}\n"
            f"dataset_path: {data}\n"
            "dataset_kwargs:\n  load_from_disk: true\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            "doc_to_visual: image\n"
            "doc_to_text: question\n"
            "doc_to_target: answer\n"
            "generation_kwargs:\n  max_new_tokens: 10\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 0.0\n"
        )
    return tasks


@pytest.fixture(scope="module")
def lmms_eval_task(rows, tmp_path_factory):
    pytest.importorskip("lmms_eval")
    return write_task(str(tmp_path_factory.mktemp("lmms_task")), rows)


def lmms_eval_run(tasks_dir, model_args):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model=MODEL_ID,
        model_args=model_args,
        tasks=[TASK],
        batch_size=8,
        device="cpu",
        task_manager=TaskManager("WARNING", include_path=tasks_dir, include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        process_docs_parallel=1,
    )


def test_lmms_eval_finds_the_model_through_the_entry_point():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model, list_available_models

    assert MODEL_ID in list_available_models()
    assert get_model(MODEL_ID) is UniGameLMM


@pytest.mark.parametrize("with_perturber", [False, True], ids=["adapter", "adapter+perturber"])
def test_lmms_eval_accuracy_equals_the_evaluators(rows, adapter_dir, perturber_dir, lmms_eval_task, with_perturber):
    model_args = f"pretrained={TINY_DIGITS},adapter={adapter_dir}"
    if with_perturber:
        model_args += f",perturber={perturber_dir}"
    results = lmms_eval_run(lmms_eval_task, model_args)
    accuracy = results["results"][TASK]["exact_match,none"]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    responses = [s["filtered_resps"][0] for s in samples]

    metrics, predictions = evaluator_results(
        rows, adapter=adapter_dir, perturber=perturber_dir if with_perturber else None
    )
    condition = "perturber" if with_perturber else "clean"
    assert len(samples) == len(rows)
    assert responses == [row[condition] for row in predictions]
    assert accuracy == pytest.approx(metrics[f"{condition}/vqa_accuracy"])


@pytest.mark.slow
def test_lmms_eval_cli(rows, adapter_dir, lmms_eval_task, tmp_path):
    """`python -m lmms_eval --model unigame ...` (the `lmms-eval` command) with the local task."""
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "lmms_eval", "--model", MODEL_ID,
        "--model_args", f"pretrained={TINY_DIGITS},adapter={adapter_dir}",
        "--tasks", TASK, "--include_path", lmms_eval_task, "--batch_size", "8", "--device", "cpu",
        "--output_path", str(output),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics, _ = evaluator_results(rows, adapter=adapter_dir)
    (results_file,) = output.rglob("*_results.json")
    with open(results_file) as f:
        written = json.load(f)
    assert written["config"]["model"] == MODEL_ID
    assert written["results"][TASK]["exact_match,none"] == pytest.approx(metrics["clean/vqa_accuracy"])
