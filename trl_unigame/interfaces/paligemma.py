"""Interface of PaliGemma: understanding only."""

from __future__ import annotations

from .base import register_interface
from .vlm import UnderstandingOnlyInterface


@register_interface
class PaliGemmaInterface(UnderstandingOnlyInterface):
    """PaliGemma / PaliGemma 2. Understanding site: `model.multi_modal_projector`. The processor prefixes the image
    tokens itself and the answer is the suffix (`token_type_ids` 1, attended causally). No generation site: mining is
    off, the game is played in embedding space."""

    family = "paligemma (PaliGemmaForConditionalGeneration; understanding only)"
    MODEL_CLASSES = ("PaliGemmaForConditionalGeneration",)
    UNDERSTANDING_SITE = "model.multi_modal_projector"
    ANSWER_TOKEN_TYPE = 1
    QUANTIZATION_SKIP_MODULES = ("model.multi_modal_projector", "lm_head")

    def _chat_prompt(self, text: str) -> str:
        return f"{self._require_processor().image_token}{text}"  # the processor adds BOS and the closing newline
