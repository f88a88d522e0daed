"""Interface of Idefics3 and SmolVLM: understanding only."""

from __future__ import annotations

from .base import register_interface
from .vlm import UnderstandingOnlyInterface


@register_interface
class Idefics3Interface(UnderstandingOnlyInterface):
    """Idefics3 / SmolVLM. Understanding site: `model.connector` (pixel shuffle + projection to the LLM's width).
    No generation site: mining is off, the game is played in embedding space."""

    family = "idefics3 (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration; understanding only)"
    MODEL_CLASSES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    UNDERSTANDING_SITE = "model.connector"
    QUANTIZATION_SKIP_MODULES = ("model.connector", "lm_head")
