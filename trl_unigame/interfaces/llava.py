"""Interface of LLaVA, LLaVA-NeXT and LLaVA-OneVision: understanding only."""

from __future__ import annotations

from .base import register_interface
from .vlm import UnderstandingOnlyInterface


@register_interface
class LlavaInterface(UnderstandingOnlyInterface):
    """LLaVA / LLaVA-NeXT / LLaVA-OneVision. Understanding site: `model.multi_modal_projector`, whose output (vision
    features projected to the LLM's width, `(batch or patches, tokens, hidden)`) replaces the image placeholders.
    No generation site: mining is off, the game is played in embedding space."""

    family = (
        "llava (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, "
        "LlavaOnevisionForConditionalGeneration; understanding only)"
    )
    MODEL_CLASSES = (
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    )
    UNDERSTANDING_SITE = "model.multi_modal_projector"
    QUANTIZATION_SKIP_MODULES = ("model.multi_modal_projector", "lm_head")
