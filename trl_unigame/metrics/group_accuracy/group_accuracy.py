# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""NaturalBench-style group accuracy (Acc, Q-Acc, I-Acc, G-Acc), as an `evaluate` metric module.

Self-contained on purpose: `evaluate.load` copies this file alone into its module cache.
"""

import string
from collections import defaultdict

import datasets
import evaluate


_DESCRIPTION = """
Accuracy over groups of question-image pairs, as NaturalBench reports it (a group there is 2 questions x 2 images
whose answers flip between the images, so a model that ignores the image cannot be right on the whole group):

- `acc`: fraction of question-image pairs answered right;
- `q_acc`: fraction of (group, question) that are right on every image of their group they are asked about;
- `i_acc`: fraction of (group, image) whose every question is answered right;
- `g_acc`: fraction of groups whose every pair is right (chance on NaturalBench: 6.25%).

A pair is right when the prediction equals the reference (or one of the references) up to case, punctuation,
surrounding spaces and the articles a/an/the: `"Yes."` matches `"yes"`, `"B"` matches `"b"`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): The model's answer for each question-image pair.
    references (`list[str]` or `list[list[str]]`): The reference answer(s) of each pair.
    group_ids (`list[str | int]`): The group of each pair.
    question_ids (`list[str | int]`): Which question of its group the pair asks (the question text will do).
    image_ids (`list[str | int]`): Which image of its group the pair shows.
Returns:
    acc, q_acc, i_acc, g_acc (`float`): In [0, 1]; see the description.
Examples:
    >>> metric = evaluate.load(trl_unigame.metrics.path("group_accuracy"))
    >>> metric.compute(
    ...     predictions=["yes", "no", "no", "no"], references=["yes", "no", "no", "yes"],
    ...     group_ids=[0, 0, 0, 0], question_ids=["q1", "q1", "q2", "q2"], image_ids=["i1", "i2", "i1", "i2"],
    ... )
    {'acc': 0.75, 'q_acc': 0.5, 'i_acc': 0.5, 'g_acc': 0.0}
"""

_CITATION = """
@inproceedings{li2024naturalbench,
  title     = {NaturalBench: Evaluating Vision-Language Models on Natural Adversarial Samples},
  author    = {Li, Baiqi and Lin, Zhiqiu and Peng, Wenxuan and others},
  booktitle = {NeurIPS Datasets and Benchmarks},
  year      = {2024},
}
"""

_ID_COLUMNS = ("group_ids", "question_ids", "image_ids")
_STRIP = str.maketrans("", "", string.punctuation)


def normalize(answer: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, spaces collapsed."""
    words = str(answer).lower().translate(_STRIP).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def group_scores(predictions, references, group_ids, question_ids, image_ids) -> dict:
    """Acc, Q-Acc, I-Acc and G-Acc (see the module's description) as a dict of floats."""
    n = len(predictions)
    lengths = {len(references), len(group_ids), len(question_ids), len(image_ids)}
    if lengths != {n}:
        raise ValueError(
            "predictions, references, group_ids, question_ids and image_ids must have the same length; got "
            f"{n}, {len(references)}, {len(group_ids)}, {len(question_ids)} and {len(image_ids)}."
        )
    if n == 0:
        return {"acc": 0.0, "q_acc": 0.0, "i_acc": 0.0, "g_acc": 0.0}
    questions, images, groups = defaultdict(list), defaultdict(list), defaultdict(list)
    right = []
    for prediction, refs, group, question, image in zip(predictions, references, group_ids, question_ids, image_ids):
        refs = [refs] if isinstance(refs, str) else list(refs)
        ok = normalize(prediction) in {normalize(r) for r in refs}
        right.append(ok)
        questions[(group, question)].append(ok)
        images[(group, image)].append(ok)
        groups[group].append(ok)

    def share(buckets):
        return sum(all(v) for v in buckets.values()) / len(buckets)

    return {"acc": sum(right) / n, "q_acc": share(questions), "i_acc": share(images), "g_acc": share(groups)}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GroupAccuracy(evaluate.Metric):
    """NaturalBench-style Acc, Q-Acc, I-Acc and G-Acc from group, question and image ids."""

    def _info(self):
        string_feature = datasets.Value("string")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": string_feature,
                    "references": datasets.Sequence(string_feature),
                    **{name: string_feature for name in _ID_COLUMNS},
                }
            ),
            reference_urls=["https://linzhiqiu.github.io/papers/naturalbench/"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds a batch of predictions and references (a reference may be one string or a list of strings)."""
        # Ids may be ints and one reference a plain string: both stored as strings / lists of strings.
        if references is not None:
            references = [[r] if isinstance(r, str) else list(r) for r in references]
        for name in _ID_COLUMNS:
            if kwargs.get(name) is not None:
                kwargs[name] = [str(i) for i in kwargs[name]]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Adds one prediction and its reference (one string or a list of strings)."""
        if isinstance(reference, str):
            reference = [reference]
        for name in _ID_COLUMNS:
            if kwargs.get(name) is not None:
                kwargs[name] = str(kwargs[name])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, group_ids, question_ids, image_ids):
        return group_scores(predictions, references, group_ids, question_ids, image_ids)
