"""What understanding-only VLMs share: one understanding site (the module whose output is the visual tokens the LLM
receives), no generation site, and a processor that expands image placeholders itself."""

from __future__ import annotations

import torch
from torch import nn

from .base import VisualTokenInterface, append_answers, per_sample_answer_loss, to_pil_images


LLM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


class UnderstandingOnlyInterface(VisualTokenInterface):
    """Base of the interfaces of VLMs that understand images but cannot generate them.

    The game on such a model is played in embedding space only: the perturber acts at the understanding site and no
    decoded hard samples can be mined (`can_generate` is `False`). A family subclass names its model classes and
    its understanding site; the prompt, the inputs and the loss are shared.
    """

    #: transformers class names this interface knows.
    MODEL_CLASSES: tuple[str, ...] = ()
    #: Dotted path, from the `...ForConditionalGeneration` model, of the module whose output is the visual tokens.
    UNDERSTANDING_SITE: str = "model.multi_modal_projector"
    #: Per-token tensors the processor returns beside `input_ids` (extended over the answer, see `append_answers`).
    PER_TOKEN_KEYS: tuple[str, ...] = ("token_type_ids", "mm_token_type_ids")
    #: Value of those tensors on the answer tokens.
    ANSWER_TOKEN_TYPE: int = 0
    #: Kept out of 4-bit quantization.
    QUANTIZATION_SKIP_MODULES: tuple[str, ...] = ("lm_head",)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.MODEL_CLASSES

    @property
    def hidden_size(self) -> int:
        config = self.base_model.config
        return getattr(config, "text_config", config).hidden_size

    @property
    def understanding_site(self) -> nn.Module:
        return self.base_model.get_submodule(self.UNDERSTANDING_SITE)

    @property
    def generation_site(self) -> None:
        return None

    @property
    def lora_target_modules(self) -> str:
        return rf".*language_model\..*\.({LLM_PROJECTIONS})"

    @property
    def quantization_skip_modules(self) -> list[str]:
        return list(self.QUANTIZATION_SKIP_MODULES)

    def _chat_prompt(self, text: str) -> str:
        processor = self._require_processor()
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return f"USER: {processor.image_token}\n{text} ASSISTANT:"

    def _encode(self, images, questions):
        prompts = [self._chat_prompt(q) for q in questions]
        return self._require_processor()(
            text=prompts, images=to_pil_images(images), return_tensors="pt", padding=True, padding_side="left"
        )

    def build_understanding_inputs(self, images, questions, answers):
        """Left-padded `input_ids`, `attention_mask`, `labels` (-100 except answer and EOS) and the image tensors the
        processor returns (`pixel_values`, and `image_grid_thw`, `pixel_attention_mask` ... where the model has them).

        Args:
            images: PIL images, or a float tensor `(B, 3, H, W)` in `[0, 1]`, or uint8 tensors.
            questions (`list[str]`): One question per image.
            answers (`list[str]`): One answer per image.
        """
        if not (len(images) == len(questions) == len(answers)):
            raise ValueError(
                f"Got {len(images)} images, {len(questions)} questions and {len(answers)} answers; they must match."
            )
        encoded = dict(self._encode(images, questions))
        tokenizer = self._require_processor().tokenizer
        return append_answers(encoded, answers, tokenizer, self.PER_TOKEN_KEYS, self.ANSWER_TOKEN_TYPE)

    def _model_inputs(self, inputs):
        return {
            k: (v.to(self.dtype) if k == "pixel_values" else v)
            for k, v in inputs.items()
            if k != "labels" and isinstance(v, torch.Tensor)
        }

    def understanding_loss(self, model, inputs):
        return per_sample_answer_loss(model, inputs, **self._model_inputs(inputs))

    @torch.no_grad()
    def answer(self, model, images, questions, max_new_tokens=16):
        inputs = {k: v.to(self.device) for k, v in self._model_inputs(self._encode(images, questions)).items()}
        return self._greedy_answers(model, inputs, max_new_tokens)
