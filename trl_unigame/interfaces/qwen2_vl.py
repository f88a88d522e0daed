"""Interface of Qwen2-VL and Qwen2.5-VL: understanding only."""

from __future__ import annotations

from .base import register_interface
from .vlm import UnderstandingOnlyInterface


@register_interface
class Qwen2VLInterface(UnderstandingOnlyInterface):
    """Qwen2-VL / Qwen2.5-VL. Understanding site: `model.visual.merger`, whose output is every image's visual tokens
    flattened to `(tokens, hidden)` with no batch dimension (the perturber acts per token, so the shape does not
    matter). No generation site: mining is off, the game is played in embedding space."""

    family = "qwen2_vl (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration; understanding only)"
    MODEL_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    UNDERSTANDING_SITE = "model.visual.merger"
    QUANTIZATION_SKIP_MODULES = ("model.visual", "lm_head")

    def _chat_prompt(self, text: str) -> str:
        processor = self._require_processor()
        if getattr(processor, "chat_template", None):
            return super()._chat_prompt(text)
        return f"USER: <|vision_start|>{processor.image_token}<|vision_end|>{text} ASSISTANT:"
