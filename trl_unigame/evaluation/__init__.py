"""Evaluation of unified models: accuracy, robustness (attacks, perturbers, corruptions) and consistency both ways
(caption -> own image -> own answer; real image -> own caption -> own drawing -> similarity).

Used by the trainer, the example scripts and the benchmarks; it never imports the trainer.
"""

from .attacks import ATTACK_BUDGETS, perturbation_at, pgd_attack, project_to_ball
from .corruptions import CORRUPTIONS, DEFAULT_SEVERITIES, SEVERITIES, corrupt_image, parse_corruptions
from .evaluator import (
    DEFAULT_ATTACK_EPS,
    DEFAULT_CAPTION_QUESTION,
    UniGameEvaluator,
    majority_answer,
    reference_answers,
)
from .similarity import CLIPImageSimilarity, JudgeAgreement, as_image_similarity


__all__ = [
    "ATTACK_BUDGETS",
    "CLIPImageSimilarity",
    "CORRUPTIONS",
    "DEFAULT_ATTACK_EPS",
    "DEFAULT_CAPTION_QUESTION",
    "DEFAULT_SEVERITIES",
    "SEVERITIES",
    "JudgeAgreement",
    "UniGameEvaluator",
    "as_image_similarity",
    "corrupt_image",
    "majority_answer",
    "parse_corruptions",
    "perturbation_at",
    "pgd_attack",
    "project_to_ball",
    "reference_answers",
]
