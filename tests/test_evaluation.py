"""Evaluation: the shipped metrics on cases worked out by hand, the attack, the perturber, the corruptions, the round
trip, the trainer's generative evaluation and the example script."""

import json
import os
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch
from PIL import Image

import trl_unigame.metrics
from trl_unigame import Perturber, UniGameConfig, UniGameTrainer, get_interface
from trl_unigame.evaluation import (
    CORRUPTIONS,
    SEVERITIES,
    UniGameEvaluator,
    corrupt_image,
    parse_corruptions,
    perturbation_at,
    pgd_attack,
)
from trl_unigame.interfaces import JanusInterface
from trl_unigame.testing import save_tiny_janus, tiny_janus, tiny_vqa_dataset


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEN = ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]  # 2 of 10 annotators say "2"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def answering_janus():
    """A tiny Janus trained (300 Adam steps, ~5 s) until it answers its 8 rows right; with those rows."""
    torch.manual_seed(0)
    model, processor = tiny_janus(seed=0)
    rows = tiny_vqa_dataset(8, seed=1)
    interface = get_interface(model, processor)
    inputs = interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = interface.understanding_loss(model, inputs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.zero_grad(set_to_none=True)  # weights still require grad, as during training: attacks must leave them
    assert interface.answer(model, rows["image"], rows["question"]) == list(rows["answer"])
    return model, processor, rows


def evaluator(model, processor, **kwargs):
    kwargs.setdefault("show_progress", False)
    kwargs.setdefault("attack_eps", None)
    return UniGameEvaluator(model, processor, **kwargs)


class ModelCalls:
    """Counts forward passes of a model (to check that bad inputs fail before any work)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *args):
        self.count += 1


# ---------------------------------------------------------------------------------------------- vqa_accuracy
@pytest.fixture(scope="module")
def vqa_metric():
    return evaluate.load(trl_unigame.metrics.path("vqa_accuracy"))


@pytest.mark.parametrize(
    "matching, expected",
    [
        (0, 0.0),
        (1, (1 * 0 + 9 * 1 / 3) / 10),  # the matching annotator sees 0 others; each other one sees 1
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # = 0.6, not min(2/3, 1)
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # = 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_over_ten_annotators(vqa_metric, matching, expected):
    references = ["cat"] * matching + ["dog"] * (10 - matching)
    result = vqa_metric.compute(predictions=["cat"], references=[references])
    assert result["vqa_accuracy"] == pytest.approx(expected)


def test_vqa_accuracy_two_of_ten_is_point_six(vqa_metric):
    assert vqa_metric.compute(predictions=["2"], references=[TEN])["vqa_accuracy"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("Two", "2"),  # number words -> digits, case
        ("the dog.", "dog"),  # articles and the final period
        ("A red circle", "red circle"),
        ("dont know", "don't know"),  # contractions
        ("yes!", "yes"),
        ("1,000", "1000"),  # comma inside a number
        ("  ten\n", "10"),
        ("3.5", "3.5"),  # a decimal point stays
    ],
)
def test_vqa_normalisation_matches(vqa_metric, prediction, reference):
    assert vqa_metric.compute(predictions=[prediction], references=[reference])["vqa_accuracy"] == 1.0


@pytest.mark.parametrize("prediction, reference", [("3.5", "35"), ("red", "red circle"), ("no", "yes")])
def test_vqa_normalisation_keeps_different_answers_apart(vqa_metric, prediction, reference):
    assert vqa_metric.compute(predictions=[prediction], references=[reference])["vqa_accuracy"] == 0.0


def test_vqa_punctuation_next_to_a_space_is_read_on_the_answer_as_given(vqa_metric):
    # "(" becomes a space, which puts a space before "-"; "-" touched no space in the answer, so it becomes a space too
    references = ["x(-y z-w"] * 9 + ["other"]
    assert vqa_metric.compute(predictions=["x y z w"], references=[references])["vqa_accuracy"] == 1.0
    assert vqa_metric.compute(predictions=["x y zw"], references=[references])["vqa_accuracy"] == 0.0


@pytest.mark.parametrize("periods, expected", [(32, 1.0), (33, 0.0)])
def test_vqa_removes_at_most_32_periods(vqa_metric, periods, expected):
    references = ["yes"] * 9 + ["no"]
    result = vqa_metric.compute(predictions=["yes" + "." * periods], references=[references])
    assert result["vqa_accuracy"] == expected


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Yes.", "yes", 0.0),  # not normalised when all annotators agree
        ("the", "a", 0.0),  # both would normalise to ""
        ("two", "2", 0.0),
        ("A", "A", 1.0),  # text read off the image, matched as written
        (" yes\n", "yes", 1.0),  # newlines, tabs and surrounding spaces are always cleaned
        ("yes", "yes\t", 1.0),
    ],
)
def test_vqa_answers_are_normalised_only_when_annotators_disagree(vqa_metric, prediction, answer, expected):
    result = vqa_metric.compute(predictions=[prediction], references=[[answer] * 10])
    assert result["vqa_accuracy"] == expected
    # One different annotator is enough for both sides to be normalised.
    result = vqa_metric.compute(predictions=[prediction], references=[[answer] * 9 + ["other"]])
    assert result["vqa_accuracy"] == 1.0


def test_vqa_single_reference_is_exact_match_and_string_and_list_mix(vqa_metric):
    result = vqa_metric.compute(predictions=["Yes", "no", "2"], references=["yes", ["yes"], TEN])
    assert result["vqa_accuracy"] == pytest.approx((1 + 0 + 0.6) / 3)
    module = trl_unigame.metrics.load_module("vqa_accuracy")
    assert module.vqa_scores(["Yes", "no", "2"], ["yes", ["yes"], TEN]) == pytest.approx([1, 0, 0.6])


def test_reference_answers_accept_every_layout():
    from trl_unigame.evaluation import majority_answer, reference_answers

    assert reference_answers("yes") == ["yes"] and reference_answers(2) == ["2"]
    assert reference_answers([{"answer": "a", "answer_confidence": "yes"}, {"answer": "b"}]) == ["a", "b"]
    assert majority_answer(["b", "a", "a", "b", "a"]) == "a"


def test_vqa_metric_accumulates_batches(vqa_metric):
    vqa_metric.add_batch(predictions=["cat"], references=["cat"])
    vqa_metric.add(prediction="2", reference=TEN)
    assert vqa_metric.compute()["vqa_accuracy"] == pytest.approx(0.8)


def test_unknown_metric_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="vqa_accuracy.*group_accuracy"):
        trl_unigame.metrics.path("bleu")


def test_metrics_are_package_data():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"metrics/*/*.py"' in f.read()
    for name in trl_unigame.metrics.METRIC_NAMES:
        assert os.path.isfile(os.path.join(trl_unigame.metrics.path(name), f"{name}.py"))


# -------------------------------------------------------------------------------------------- group_accuracy
def test_group_accuracy_by_hand():
    """Two NaturalBench groups of 2 questions x 2 images. Group 0 is all right. In group 1, question q1 is wrong on
    image i2 only: pairs 7/8, questions 3/4 (q1 of group 1 fails), images 3/4 (i2 of group 1 fails), groups 1/2."""
    metric = evaluate.load(trl_unigame.metrics.path("group_accuracy"))
    refs = ["yes", "no", "no", "yes"]
    result = metric.compute(
        predictions=["yes", "no", "no", "yes"] + ["Yes.", "yes", "no", "yes"],
        references=refs + refs,
        group_ids=[0, 0, 0, 0, 1, 1, 1, 1],
        question_ids=["q1", "q1", "q2", "q2"] * 2,
        image_ids=["i1", "i2", "i1", "i2"] * 2,
    )
    assert result == pytest.approx({"acc": 7 / 8, "q_acc": 3 / 4, "i_acc": 3 / 4, "g_acc": 1 / 2})


def test_group_accuracy_counts_each_key_within_its_group():
    # The same question text and image name in two groups are two questions and two images.
    module = trl_unigame.metrics.load_module("group_accuracy")
    result = module.group_scores(["a", "b"], ["a", "a"], ["g1", "g2"], ["q", "q"], ["i", "i"])
    assert result == {"acc": 0.5, "q_acc": 0.5, "i_acc": 0.5, "g_acc": 0.5}
    with pytest.raises(ValueError, match="same length"):
        module.group_scores(["a"], ["a", "b"], ["g"], ["q"], ["i"])


# ----------------------------------------------------------------------------------------------- corruptions
def textured(mode: str, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_size_and_mode_and_change_pixels(name, mode):
    image = textured(mode)
    for severity in SEVERITIES:
        out = corrupt_image(image, name, severity, seed=[0, 3])
        assert out.size == image.size and out.mode == mode
        if severity >= 3:  # a mild blur of a 24 px image moves sub-pixel: it may round to the same pixels
            assert not np.array_equal(np.asarray(out), np.asarray(image)), (name, severity)
    if mode == "RGBA":  # the alpha channel is not corrupted
        assert np.array_equal(np.asarray(out)[..., 3], np.asarray(image)[..., 3])


def test_corruptions_grow_with_severity_and_follow_the_seed():
    image = textured("RGB", (64, 64))
    for name in CORRUPTIONS:
        errors = [
            np.abs(np.asarray(corrupt_image(image, name, s), np.float32) - np.asarray(image, np.float32)).mean()
            for s in (1, 5)
        ]
        assert errors[1] > errors[0], name
    a, b, c = (corrupt_image(image, "noise", 3, seed=s) for s in ([0, 1], [0, 1], [0, 2]))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))


def test_corruption_specs_are_parsed_and_checked():
    assert parse_corruptions(["noise_3", "blur", ("jpeg", 2)]) == [
        ("noise", 3),
        ("blur", 1),
        ("blur", 3),
        ("blur", 5),
        ("jpeg", 2),
    ]
    with pytest.raises(ValueError, match="Unknown corruption 'fog'.*blur.*contrast.*jpeg.*noise"):
        parse_corruptions(["fog_2"])
    with pytest.raises(ValueError, match="severity"):
        parse_corruptions(["noise_7"])
    with pytest.raises(ValueError, match="name_severity"):
        parse_corruptions(["noise_high"])


# ---------------------------------------------------------------------------------------------------- attack
@pytest.mark.parametrize("budget, eps", [("absolute", 0.05), ("relative", 0.1)])
def test_pgd_stays_within_its_per_token_budget_and_uses_it(answering_janus, budget, eps):
    model, processor, rows = answering_janus
    interface = get_interface(model, processor)
    inputs = interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])
    clean = []
    handle = interface.understanding_site.register_forward_hook(lambda m, a, o: clean.append(o.detach()))
    with torch.no_grad():
        clean_loss = interface.understanding_loss(model, inputs)
    handle.remove()
    radius = eps * clean[0].norm(dim=-1) if budget == "relative" else torch.full(clean[0].shape[:-1], eps)
    delta = pgd_attack(interface, model, inputs, eps, steps=3, budget=budget)
    assert delta.shape == clean[0].shape
    norms = delta.norm(dim=-1)
    assert (norms <= radius * (1 + 1e-5)).all()
    assert (norms >= radius * 0.99).float().mean() > 0.5  # most tokens move to their budget's edge
    assert all(p.grad is None for p in model.parameters())
    # The answering path sees exactly the perturbation found, and the loss went up.
    seen = []
    with perturbation_at(interface.understanding_site, delta):
        handle = interface.understanding_site.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
        with torch.no_grad():
            attacked_loss = interface.understanding_loss(model, inputs)
        handle.remove()
    torch.testing.assert_close(seen[0] - clean[0], delta, atol=1e-6, rtol=1e-5)
    assert attacked_loss.mean() > clean_loss.mean()
    assert not interface.understanding_site._forward_hooks  # nothing left behind


def test_attack_lowers_the_accuracy_of_a_model_that_answers_right(answering_janus):
    model, processor, rows = answering_janus
    metrics = evaluator(model, processor, attack_eps=[0.001, 0.3]).evaluate(rows)
    assert metrics["clean/vqa_accuracy"] == 1.0
    assert metrics["attack_eps0.001/vqa_accuracy"] >= 0.75  # a tiny budget barely matters
    assert metrics["attack_eps0.3/vqa_accuracy"] <= 0.5
    relative = evaluator(model, processor, attack_eps=0.5, attack_budget="relative").evaluate(rows)
    assert relative["attack_rel0.5/vqa_accuracy"] < relative["clean/vqa_accuracy"]


def test_default_budget_is_the_perturbers_eps_max(answering_janus):
    model, processor, rows = answering_janus
    ev = UniGameEvaluator(model, processor, show_progress=False)
    assert ev.attack_eps == [0.02] and ev.conditions() == ["clean", "attack_eps0.02"]


# ------------------------------------------------------------------------------------- perturber, predictions
def test_perturber_folder_round_trips_through_the_evaluator(answering_janus, tmp_path):
    model, processor, rows = answering_janus
    torch.manual_seed(0)
    strong = Perturber.for_model(model, eps_max=5.0, eps_init=4.0)
    strong.save_pretrained(tmp_path / "perturber")
    from_folder, rows_folder = evaluator(model, processor, perturber=str(tmp_path / "perturber")).evaluate(
        rows, return_predictions=True
    )
    from_object, rows_object = evaluator(model, processor, perturber=strong).evaluate(rows, return_predictions=True)
    assert from_folder == from_object
    assert [r["perturber"] for r in rows_folder] == [r["perturber"] for r in rows_object]
    assert from_folder["clean/vqa_accuracy"] == 1.0  # the perturber is off for the other conditions
    assert from_folder["perturber/vqa_accuracy"] < 1.0  # and on for its own
    assert not strong.is_attached and not get_interface(model).understanding_site._forward_hooks


def test_a_gradient_reading_perturber_is_evaluated_with_the_answer_gradient(answering_janus):
    model, processor, rows = answering_janus
    torch.manual_seed(0)
    blind = Perturber.for_model(model, eps_max=0.6, eps_init=0.5)
    torch.manual_seed(0)
    informed = Perturber.for_model(model, eps_max=0.6, eps_init=0.5, inputs="features_and_gradient")
    with torch.no_grad():
        informed.gradient_gain.fill_(100.0)  # its direction: the answer loss's gradient, as an L2 fast-gradient step
    features = evaluator(model, processor, perturber=blind).evaluate(rows)
    gradient = evaluator(model, processor, perturber=informed).evaluate(rows)
    assert features["clean/vqa_accuracy"] == gradient["clean/vqa_accuracy"] == 1.0
    # at the same budget, the direction that reads where the loss rises does the damage a fixed direction cannot
    assert gradient["perturber/vqa_accuracy"] < features["perturber/vqa_accuracy"]


def test_predictions_hold_every_condition_and_score(answering_janus):
    model, processor, rows = answering_janus
    ev = evaluator(model, processor, attack_eps=0.3, corruptions=["contrast_5"], batch_size=3)
    metrics, predictions = ev.evaluate(rows, return_predictions=True)
    assert [p["index"] for p in predictions] == list(range(len(rows)))
    for p, answer in zip(predictions, rows["answer"]):
        assert p["references"] == [answer] and p["clean"] == answer and p["clean/score"] == 1.0
        assert {"attack_eps0.3", "attack_eps0.3/score", "corrupt_contrast_5", "corrupt_contrast_5/score"} <= set(p)
    for name in ev.conditions():
        scores = [p[f"{name}/score"] for p in predictions]
        assert metrics[f"{name}/vqa_accuracy"] == pytest.approx(sum(scores) / len(scores))


def test_batching_does_not_change_results(answering_janus):
    model, processor, rows = answering_janus
    kwargs = dict(attack_eps=0.1, corruptions=["noise_5"])
    one = evaluator(model, processor, batch_size=8, **kwargs).evaluate(rows, return_predictions=True)[1]
    three = evaluator(model, processor, batch_size=3, **kwargs).evaluate(rows, return_predictions=True)[1]
    assert [r["corrupt_noise_5"] for r in one] == [r["corrupt_noise_5"] for r in three]
    assert [r["clean"] for r in one] == [r["clean"] for r in three]


def test_vqav2_answers_and_groups(answering_janus):
    model, processor, rows = answering_janus
    # Two groups of four rows; each row also gets 10 "annotators", 4 of whom agree with its answer.
    data = rows.add_column("answers", [[a] * 4 + ["other"] * 6 for a in rows["answer"]])
    data = data.remove_columns("answer").add_column("group_id", [0, 0, 0, 0, 1, 1, 1, 1])
    metrics, predictions = evaluator(model, processor, attack_eps=0.3).evaluate(data, return_predictions=True)
    assert metrics["clean/vqa_accuracy"] == 1.0
    assert metrics["clean/g_acc"] == metrics["clean/q_acc"] == metrics["clean/i_acc"] == 1.0
    groups = trl_unigame.metrics.load_module("group_accuracy")
    expected = groups.group_scores(
        [p["attack_eps0.3"] for p in predictions],
        [p["references"] for p in predictions],
        [p["group_id"] for p in predictions],
        [p["question_id"] for p in predictions],
        [p["image_id"] for p in predictions],
    )
    assert {k: metrics[f"attack_eps0.3/{k}"] for k in expected} == expected
    assert len({p["image_id"] for p in predictions}) >= 2  # images identified by their pixels


def test_round_trip_and_judge_see_the_models_own_images(janus, vqa, clip_scorer):
    model, processor = janus
    rows = vqa.select(range(4))
    metrics, predictions = evaluator(model, processor, consistency=True, judge=clip_scorer, seed=3).evaluate(
        rows, return_predictions=True
    )
    assert {"consistency/vqa_accuracy", "consistency/judge_score"} <= set(metrics)
    images = get_interface(model, processor).generate_images(
        rows["caption"], num_images=1, generator=torch.Generator().manual_seed(3)
    )
    assert metrics["consistency/judge_score"] == pytest.approx(
        float(torch.as_tensor(clip_scorer(images, rows["caption"])).mean())
    )
    own = get_interface(model, processor).answer(model, images, rows["question"], max_new_tokens=10)
    assert [p["consistency"] for p in predictions] == own


def test_rows_without_caption_are_left_out_of_the_round_trip(janus, vqa):
    model, processor = janus
    rows = vqa.select(range(3)).map(lambda r, i: {"caption": r["caption"] if i else ""}, with_indices=True)
    _, predictions = evaluator(model, processor, consistency=True).evaluate(rows, return_predictions=True)
    assert "consistency" not in predictions[0] and all("consistency" in p for p in predictions[1:])


def test_lora_model_is_evaluated(janus, vqa):
    from peft import LoraConfig, get_peft_model

    model, processor = janus
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=get_interface(model).lora_target_modules))
    metrics = evaluator(peft_model, processor, attack_eps=0.02).evaluate(vqa.select(range(4)))
    assert set(metrics) == {"clean/vqa_accuracy", "attack_eps0.02/vqa_accuracy"}
    assert all(p.grad is None for p in peft_model.parameters())


# ------------------------------------------------------------------------------------------ reverse consistency
DIGIT_CAPTION = dict(
    caption_question=["What color is the digit?", "What digit is this?"], caption_template="a {0} {1}"
)


@pytest.fixture(scope="module")
def digit_judge():
    from trl_unigame.digit_judge import DigitJudge

    return DigitJudge()


def test_reverse_consistency_captions_draws_and_judges_against_the_real_image(digit_judge):
    from trl_unigame.digits import digits_vqa_dataset
    from trl_unigame.evaluation import JudgeAgreement
    from trl_unigame.evaluation.evaluator import REVERSE_SEED
    from trl_unigame.testing import pretrained_tiny_janus

    model, processor = pretrained_tiny_janus()
    rows = digits_vqa_dataset("test", skills=("digit",), seed=1, max_scans=8)
    settings = dict(consistency=True, generation_guidance_scale=3.0, generation_temperature=0.7, seed=2)
    metrics, predictions = evaluator(
        model, processor, reverse_consistency=True, image_similarity=digit_judge, **DIGIT_CAPTION, **settings
    ).evaluate(rows, return_predictions=True)
    # The tiny model's caption: its own answers in the dataset's caption format.
    interface = get_interface(model, processor)
    colors = interface.answer(model, rows["image"], ["What color is the digit?"] * 8, max_new_tokens=32)
    digits = interface.answer(model, rows["image"], ["What digit is this?"] * 8, max_new_tokens=32)
    captions = [f"a {c} {d}" for c, d in zip(colors, digits)]
    assert [p["reverse_consistency"] for p in predictions] == captions
    assert metrics["reverse_consistency/caption_accuracy"] == pytest.approx(
        np.mean([c == r for c, r in zip(captions, rows["caption"])])
    )
    # Its drawings of its own captions, compared with the real scans by the judge: same digit and same colour.
    pixels = interface.generate_images(
        captions, guidance_scale=3.0, temperature=0.7, generator=torch.Generator().manual_seed(2 + REVERSE_SEED)
    )
    expected = JudgeAgreement(digit_judge)(pixels, rows["image"])
    assert [p["reverse_consistency/similarity"] for p in predictions] == expected.tolist()
    assert metrics["reverse_consistency/similarity"] == pytest.approx(float(expected.mean()))
    assert metrics["reverse_consistency/caption_accuracy"] >= 0.75 and metrics["reverse_consistency/similarity"] >= 0.5
    # The reverse round trip draws from its own generator: the round trip is the same with it off.
    alone = evaluator(model, processor, **settings).evaluate(rows)
    assert alone == {k: v for k, v in metrics.items() if not k.startswith("reverse_consistency/")}


def test_reverse_consistency_with_clip_image_cosine(janus, vqa, clip_scorer):
    from trl_unigame.evaluation import CLIPImageSimilarity

    model, processor = janus
    rows = vqa.select(range(3)).remove_columns("caption")  # no caption needed; then no caption accuracy
    metrics, predictions = evaluator(
        model, processor, reverse_consistency=True, image_similarity=clip_scorer, caption_max_new_tokens=4
    ).evaluate(rows, return_predictions=True)
    assert set(metrics) == {"clean/vqa_accuracy", "reverse_consistency/similarity"}
    assert all(isinstance(p["reverse_consistency"], str) for p in predictions)
    assert -1 <= metrics["reverse_consistency/similarity"] <= 1
    similarity = CLIPImageSimilarity(clip_scorer)
    assert similarity(rows["image"], rows["image"]).tolist() == pytest.approx([1.0] * 3, abs=1e-5)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_fail_before_any_work(janus, vqa):
    model, processor = janus
    calls = ModelCalls(model)
    with pytest.raises(
        ValueError, match=r"missing the column\(s\) \['answer.*it has \['image', 'question', 'caption'\]"
    ):
        evaluator(model, processor).evaluate(vqa.remove_columns("answer"))
    with pytest.raises(ValueError, match="Unknown corruption 'snow'"):
        evaluator(model, processor, corruptions=["snow_2"])
    with pytest.raises(ValueError, match="needs a 'caption' column"):
        evaluator(model, processor, consistency=True).evaluate(vqa.remove_columns("caption"))
    with pytest.raises(ValueError, match="consistency=True"):
        evaluator(model, processor, judge=lambda images, texts: [0.0] * len(texts))
    with pytest.raises(ValueError, match="needs an `image_similarity`"):
        evaluator(model, processor, reverse_consistency=True)
    with pytest.raises(ValueError, match="reverse_consistency=True"):
        evaluator(model, processor, image_similarity=lambda generated, real: [1.0] * len(real))
    with pytest.raises(ValueError, match="positional fields"):
        evaluator(model, processor, reverse_consistency=True, image_similarity=max, caption_template="a {color}")
    with pytest.raises(ValueError, match="empty"):
        evaluator(model, processor).evaluate(vqa.select([]))
    with pytest.raises(ValueError, match="must be > 0"):
        evaluator(model, processor, attack_eps=[0.02, 0.0])
    with pytest.raises(ValueError, match="attack_budget"):
        evaluator(model, processor, attack_eps=0.02, attack_budget="linf")
    with pytest.raises(ValueError, match="hidden size 48"):
        evaluator(model, processor, perturber=Perturber.for_model(tiny_janus(hidden_size=48)[0]))
    assert calls.count == 0
    calls.handle.remove()


class UnderstandingOnlyInterface(JanusInterface):
    """A family whose visual tokens are not exposed at a module (e.g. computed inside a fused kernel)."""

    @property
    def understanding_site(self):
        raise NotImplementedError("the visual tokens are not the output of one module")


def test_attack_on_an_interface_that_cannot_attack_is_refused(janus, vqa):
    model, processor = janus
    interface = UnderstandingOnlyInterface(model, processor)
    with pytest.raises(NotImplementedError, match="UnderstandingOnlyInterface cannot be attacked.*attack_eps=None"):
        UniGameEvaluator(model, processor, interface=interface, attack_eps=0.02, show_progress=False)
    metrics = UniGameEvaluator(model, processor, interface=interface, attack_eps=None, show_progress=False).evaluate(
        vqa.select(range(2))
    )
    assert set(metrics) == {"clean/vqa_accuracy"}


# ---------------------------------------------------------------------------------------------------- trainer
def make_trainer(tmp_path, vqa, **overrides):
    from peft import LoraConfig

    model, processor = tiny_janus(seed=0)
    args = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_steps=1,
        report_to=[],
        disable_tqdm=True,
        consistency_model=None,
        mining_interval=0,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return UniGameTrainer(
        model,
        UniGameConfig(**args),
        train_dataset=vqa,
        eval_dataset=vqa.select(range(6)),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )


def test_trainer_generative_evaluation_reports_and_logs_accuracy(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, predict_with_generate=True, eval_attack_eps=0.05)
    trainer.perturber.enabled = True  # evaluation must turn it off and restore it
    metrics = trainer.evaluate()
    assert trainer.perturber.enabled
    assert {"eval_loss", "eval_clean/vqa_accuracy", "eval_attack_eps0.05/vqa_accuracy"} <= set(metrics)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"eval_clean/vqa_accuracy", "eval_attack_eps0.05/vqa_accuracy"} <= logged
    trainer.perturber.enabled = False
    direct = UniGameEvaluator(trainer.model, trainer.processing_class, attack_eps=0.05, show_progress=False)
    assert direct.evaluate(vqa.select(range(6)))["clean/vqa_accuracy"] == metrics["eval_clean/vqa_accuracy"]


def test_trainer_attack_budget_reads_like_the_perturbers(tmp_path, vqa):
    trainer = make_trainer(
        tmp_path, vqa, predict_with_generate=True, eval_attack_eps=0.05, perturber_budget="relative"
    )
    assert "eval_attack_rel0.05/vqa_accuracy" in trainer.evaluate()


def test_trainer_evaluation_is_unchanged_without_the_option_and_splits_a_dict(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa)
    assert not any("vqa_accuracy" in k for k in trainer.evaluate())
    trainer = make_trainer(tmp_path, vqa, predict_with_generate=True)
    metrics = trainer.evaluate({"a": vqa.select(range(2)), "b": vqa.select(range(2, 4))})
    assert {"eval_a_clean/vqa_accuracy", "eval_b_clean/vqa_accuracy", "eval_a_loss"} <= set(metrics)
    assert not any("attack" in k for k in metrics)


# ----------------------------------------------------------------------------------------------------- script
def run_script(cwd, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "evaluate_janus.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_script_runs_offline_with_no_arguments(tmp_path):
    out = run_script(tmp_path)
    assert "| model | condition | vqa_accuracy |" in out and "| base | corrupt_noise_3 |" in out
    assert f"written to {tmp_path / 'unigame-eval' / 'results.json'}" in out
    with open(tmp_path / "unigame-eval" / "results.json") as f:
        results = json.load(f)
    assert results["config"]["consistency"] is True and results["num_rows"] == 120
    base = results["results"]["base"]
    assert {"clean/vqa_accuracy", "attack_rel0.02/vqa_accuracy", "consistency/vqa_accuracy"} <= set(base)
    # The pretrained digits model reads held-out scans and its own drawings; a stronger attack hurts more.
    assert base["clean/vqa_accuracy"] > 0.9 and base["consistency/vqa_accuracy"] > 0.6
    assert base["attack_rel0.05/vqa_accuracy"] < base["clean/vqa_accuracy"]


@pytest.mark.slow
def test_script_under_two_processes_writes_one_result_that_a_single_process_agrees_with(tmp_path):
    args = ("--max_samples", "10", "--attack_budget", "relative", "--attack_eps", "0.05", "--corruptions", "noise_3")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "examples", "evaluate_janus.py")
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", "29535", script, *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| model | condition |") == 1  # only the main process prints
    with open(tmp_path / "unigame-eval" / "results.json") as f:
        sharded = json.load(f)
    run_script(tmp_path, *args, "--output_file", "single.json")
    with open(tmp_path / "unigame-eval" / "single.json") as f:
        single = json.load(f)
    assert sharded["num_rows"] == single["num_rows"] == 10
    assert sharded["results"] == single["results"]


@pytest.mark.slow
def test_script_evaluates_a_base_model_and_two_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = save_tiny_janus(str(tmp_path / "base"))
    for seed in (1, 2):
        model, _ = tiny_janus(seed=0)
        torch.manual_seed(seed)  # after building the model, which seeds the RNG itself: the LoRA weights differ
        config = LoraConfig(r=4, target_modules=get_interface(model).lora_target_modules, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(tmp_path / f"adapter{seed}")
    Perturber.for_model(model).save_pretrained(tmp_path / "perturber")
    data = tiny_vqa_dataset(6, seed=5)
    data = data.add_column("answers", [[a] * 10 for a in data["answer"]]).remove_columns("answer")
    data.to_parquet(str(tmp_path / "data.parquet"))
    out = run_script(
        tmp_path,
        *("--model_name_or_path", base, "--adapters", str(tmp_path / "adapter1"), str(tmp_path / "adapter2")),
        *("--perturber", str(tmp_path / "perturber"), "--dataset_name", "parquet"),
        *("--dataset_data_files", str(tmp_path / "data.parquet"), "--dataset_split", "train"),
        *("--attack_eps", "0.02", "0.1", "--predictions_file", "rows.jsonl", "--output_file", "r.json"),
        *("--output_dir", "out"),
    )
    with open(tmp_path / "out" / "r.json") as f:
        results = json.load(f)["results"]
    assert list(results) == ["base", "adapter1", "adapter2"]
    for metrics in results.values():
        assert set(metrics) == {
            "clean/vqa_accuracy",
            "attack_eps0.02/vqa_accuracy",
            "attack_eps0.1/vqa_accuracy",
            "perturber/vqa_accuracy",
        }
    assert out.count("| adapter2 |") == 4
    with open(tmp_path / "out" / "rows.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 18 and rows[0]["references"] == [data[0]["answers"][0]] * 10
    # The adapters change the answers (random LoRA weights): three different models were evaluated.
    answers = {m: [r["clean"] for r in rows if r["model"] == m] for m in results}
    assert answers["adapter1"] != answers["base"] and answers["adapter2"] != answers["adapter1"]


def test_every_script_option_is_documented():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from dataclasses import fields

    from evaluate_janus import EvaluationScriptArguments

    with open(os.path.join(ROOT, "docs", "evaluation.md")) as f:
        page = f.read()
    missing = [f.name for f in fields(EvaluationScriptArguments) if f"--{f.name}" not in page]
    assert not missing, f"docs/evaluation.md does not list {missing}"


def import_script():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import evaluate_janus

    return evaluate_janus


def test_script_options_without_a_model_replace_only_their_own_default_setting(tmp_path):
    script = import_script()
    args, given = script.parse_arguments(["--adapters", "a", "b"])
    (default,) = script.make_parser().parse_args_and_config(args=script.offline_default_arguments())
    assert args.adapters == ["a", "b"] and given == {"adapters"}
    for name in ("attack_eps", "attack_budget", "corruptions", "consistency", "generation_guidance_scale"):
        assert getattr(args, name) == getattr(default, name), name
    args, _ = script.parse_arguments(["--attack_eps", "0.1", "--generation_temperature=0.5"])
    assert args.attack_eps == [0.1] and args.attack_budget == "relative" and args.generation_temperature == 0.5
    assert args.corruptions == default.corruptions and args.consistency is True
    (tmp_path / "eval.yaml").write_text("corruptions: [blur_1]\nconsistency: false\n")
    args, _ = script.parse_arguments(["--config", str(tmp_path / "eval.yaml")])
    assert args.corruptions == ["blur_1"] and args.consistency is False and args.attack_eps == [0.02, 0.05]
    # With a model, the options' own defaults hold.
    args, _ = script.parse_arguments(["--model_name_or_path", "m", "--adapters", "a"])
    assert args.attack_budget == "absolute" and args.corruptions == [] and args.consistency is False


def test_script_without_a_model_reads_the_given_dataset_and_skips_the_round_trip_without_captions(tmp_path):
    from trl_unigame.digits import digits_vqa_dataset

    script = import_script()
    folder = tmp_path / "pngs" / "train"
    folder.mkdir(parents=True)
    rows = digits_vqa_dataset("test", skills=("digit",), seed=3, max_scans=5)
    with open(folder / "metadata.jsonl", "w") as f:
        for index, row in enumerate(rows):
            row["image"].save(folder / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "question": row["question"], "answer": row["answer"]}))
            f.write("\n")
    args, given = script.parse_arguments(["--dataset_name", "imagefolder", "--dataset_data_files", str(folder / "*")])
    dataset = script.load_data(args, given)
    assert len(dataset) == 5 and dataset["answer"] == rows["answer"]  # its only split, `train`, is read
    assert args.consistency is False  # no `caption` column
    args, given = script.parse_arguments(["--max_samples", "7"])
    assert len(script.load_data(args, given)) == 7 and args.consistency is True  # the digit scans


def test_script_offline_default_measures_the_reverse_consistency(tmp_path):
    script = import_script()
    args, given = script.parse_arguments(["--max_samples", "6", "--attack_steps", "1", "--output_dir", str(tmp_path)])
    assert args.reverse_consistency is True and args.image_similarity == "digit_judge"
    assert args.caption_question == ["What color is the digit?", "What digit is this?"]
    results = script.main(args, given)["base"]
    assert {"reverse_consistency/similarity", "reverse_consistency/caption_accuracy"} <= set(results)
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["config"]["caption_template"] == "a {0} {1}"
    args, _ = script.parse_arguments(["--model_name_or_path", "m", "--reverse_consistency", "true"])
    with pytest.raises(ValueError, match="--image_similarity"):
        script.load_image_similarity(args)


@pytest.mark.slow
def test_script_writes_under_the_output_dir_and_an_absolute_output_file_as_given(tmp_path):
    args = ("--max_samples", "4", "--attack_steps", "1", "--corruptions", "noise_1", "--consistency", "false")
    out = run_script(tmp_path, *args, "--output_dir", "eval", "--predictions_file", "rows.jsonl")
    with open(tmp_path / "eval" / "results.json") as f:
        assert json.load(f)["num_rows"] == 4
    assert f"written to {tmp_path / 'eval' / 'results.json'}" in out and (tmp_path / "eval" / "rows.jsonl").exists()
    out = run_script(tmp_path, *args, "--output_file", str(tmp_path / "abs.json"))
    assert (tmp_path / "abs.json").exists() and str(tmp_path / "abs.json") in out
