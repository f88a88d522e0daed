"""Interface of Idefics3 and SmolVLM: understanding only."""

from __future__ import annotations

from .base import register_interface
from .vlm import LLM_PROJECTIONS, UnderstandingOnlyInterface


@register_interface
class Idefics3Interface(UnderstandingOnlyInterface):
    """Idefics3 / SmolVLM. Understanding site: `model.connector` (pixel shuffle + projection to the LLM's width).
    No generation site: mining is off, the game is played in embedding space."""

    family = "idefics3 (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration; understanding only)"
    MODEL_CLASSES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    UNDERSTANDING_SITE = "model.connector"
    QUANTIZATION_SKIP_MODULES = ("model.connector", "lm_head")
    understanding_parameter_prefixes = ("model.text_model.", "lm_head.")

    @property
    def lora_target_modules(self) -> str:
        return rf".*text_model\..*\.({LLM_PROJECTIONS})"  # the LLM is `model.text_model` here
