"""Evaluation of unified models: accuracy, robustness (attacks, perturbers, corruptions) and round-trip consistency.

Used by the trainer, the example scripts and the benchmarks; it never imports the trainer.
"""

from .attacks import ATTACK_BUDGETS, perturbation_at, pgd_attack, project_to_ball
from .corruptions import CORRUPTIONS, DEFAULT_SEVERITIES, SEVERITIES, corrupt_image, parse_corruptions
from .evaluator import DEFAULT_ATTACK_EPS, UniGameEvaluator, majority_answer, reference_answers


__all__ = [
    "ATTACK_BUDGETS",
    "CORRUPTIONS",
    "DEFAULT_ATTACK_EPS",
    "DEFAULT_SEVERITIES",
    "SEVERITIES",
    "UniGameEvaluator",
    "corrupt_image",
    "majority_answer",
    "parse_corruptions",
    "perturbation_at",
    "pgd_attack",
    "project_to_ball",
    "reference_answers",
]
