# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""VQAv2 accuracy (the official soft accuracy over annotators), as an `evaluate` metric module.

Self-contained on purpose: `evaluate.load` copies this file alone into its module cache.
"""

import re

import datasets
import evaluate


_DESCRIPTION = """
The official VQAv2 accuracy. Predictions and reference answers are normalised as the official evaluation does
(lower case, punctuation removed or replaced by a space, number words -> digits, articles a/an/the removed, common
contractions fixed), and, as there, only when the annotators disagree: when they all gave the same answer, the
prediction must match it as written (up to newlines, tabs and surrounding spaces). With `n` reference answers (10 in
VQAv2), the accuracy of a prediction is the mean over the `n` leave-one-out subsets of
`min(#matching answers among the other n - 1 / 3, 1)`: a prediction given by at least 4 of 10 annotators scores 1,
by 2 of 10 scores (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
A single reference answer reduces to normalised exact match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): The model's answers.
    references (`list[str]` or `list[list[str]]`): For each prediction, one reference answer or the list of all
        annotators' answers (VQAv2: 10). Strings and lists may be mixed.
Returns:
    vqa_accuracy (`float`): Mean accuracy over the predictions, in [0, 1].
Examples:
    >>> metric = evaluate.load(trl_unigame.metrics.path("vqa_accuracy"))
    >>> metric.compute(predictions=["Two"], references=[["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]])
    {'vqa_accuracy': 0.9}
"""

_CITATION = """
@inproceedings{goyal2017making,
  title     = {Making the V in VQA Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author    = {Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle = {CVPR},
  year      = {2017},
}
"""

# The official evaluation's tables (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py), kept as they are there.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (not a decimal point)
# The official evaluation passes `re.UNICODE` (32) where `re.sub` takes its count: later periods stay.
_MAX_PERIODS = 32
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _clean_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Whether a mark touches a space is read on the text as given, not on the text as edited by the marks before it.
    strip_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if strip_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Normalises an answer as the official VQAv2 evaluation does.

    Punctuation next to a space in the answer as given (or any punctuation when the answer holds a number like
    `1,000`) is removed, other punctuation becomes a space; periods not followed by a digit are removed (the first
    32); then the text is lower-cased, number words become digits, articles are dropped and contractions written
    without apostrophe are fixed.

    Example: `"The Two Dogs!"` -> `"2 dogs"`; `"dont know"` -> `"don't know"`.
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(answer)))


def vqa_scores(predictions, references) -> list:
    """Per-prediction VQAv2 accuracy (see the module's description); references are strings or lists of strings."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references; they must match.")
    scores = []
    for prediction, answers in zip(predictions, references):
        answers = [answers] if isinstance(answers, str) else list(answers)
        if not answers:
            raise ValueError("Every prediction needs at least one reference answer; got an empty list.")
        if len(answers) == 1:
            scores.append(float(normalize_answer(str(prediction)) == normalize_answer(str(answers[0]))))
            continue
        predicted = _clean_whitespace(str(prediction))
        answers = [_clean_whitespace(str(a)) for a in answers]
        # As the official evaluation: answers all annotators agree on (often text read off the image) stay as written.
        if len(set(answers)) > 1:
            predicted = normalize_answer(predicted)
            answers = [normalize_answer(a) for a in answers]
        matches = [a == predicted for a in answers]
        total = sum(matches)
        # Leave out each annotator in turn: the others that match are `total - 1` when the left-out one matches.
        scores.append(sum(min(1.0, (total - m) / 3) for m in matches) / len(matches))
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VqaAccuracy(evaluate.Metric):
    """VQAv2 accuracy: normalised answers, mean over leave-one-out subsets of `min(#matches / 3, 1)`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds a batch of predictions and references (a reference may be one string or a list of strings)."""
        # One reference may be a plain string: stored as a list of one so that both kinds can be mixed.
        if references is not None:
            references = [[r] if isinstance(r, str) else list(r) for r in references]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Adds one prediction and its reference (one string or a list of strings)."""
        if isinstance(reference, str):
            reference = [reference]
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references):
        scores = vqa_scores(predictions, references)
        return {"vqa_accuracy": sum(scores) / len(scores) if scores else 0.0}
