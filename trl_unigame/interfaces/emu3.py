"""Shared visual-token interface of Emu3 (`transformers.Emu3ForConditionalGeneration`)."""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
from torch import nn

from .base import VisualTokenInterface, append_answers, per_sample_answer_loss, register_interface, to_pil_images


_LLM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# Models inside `Emu3Interface.generate_images`: while a model is in it, its `embed_tokens` is the generation site.
_GENERATING: weakref.WeakSet = weakref.WeakSet()


@register_interface
class Emu3Interface(VisualTokenInterface):
    """Emu3 (`Emu3ForConditionalGeneration`, e.g. `BAAI/Emu3-Chat-hf`, `BAAI/Emu3-Gen-hf`).

    Both paths carry images as discrete VQ codes written as `<|visual token%06d|>` ids of the LLM's vocabulary, which
    the LLM's own `embed_tokens` embeds. So the shared interface is the embeddings at visual-token ids, and both sites
    are `embed_tokens` with a [`~VisualTokenInterface.site_mask`]:

    - Understanding site: `embed_tokens`, at visual-token ids, outside image generation (the VQ encoder's codes of the
      input image, embedded by `get_image_features`). Text tokens, the end-of-line token and the image placeholders
      are never perturbed.
    - Generation site: `embed_tokens`, at visual-token ids, inside [`~Emu3Interface.generate_images`]: the embedding
      of each sampled visual token before it is fed back.

    An image of `h x w` codes takes `h * (w + 1)` tokens (an end-of-line token ends each row): about 8,190 for the
    default 720 px generation size, against 576 for Janus-Pro, so mining is far more expensive.
    """

    family = "emu3 (Emu3ForConditionalGeneration: Emu3-Chat-hf, Emu3-Gen-hf)"
    understanding_parameter_prefixes = ("model.text_model.", "lm_head.")
    #: Kept out of 4-bit quantization: the VQ model and the LM head.
    QUANTIZATION_SKIP_MODULES = ("model.vqmodel", "lm_head")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import Emu3ForConditionalGeneration

        return isinstance(model, Emu3ForConditionalGeneration)

    @property
    def config(self):
        return self.base_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def embed_tokens(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    @property
    def understanding_site(self) -> nn.Module:
        return self.embed_tokens

    @property
    def generation_site(self) -> nn.Module:
        return self.embed_tokens

    @property
    def lora_target_modules(self) -> str:
        return rf".*text_model\..*\.({_LLM_PROJECTIONS})"

    @property
    def frozen_eval_modules(self) -> list[nn.Module]:
        return [self.base_model.model.vqmodel]

    @property
    def quantization_skip_modules(self) -> list[str]:
        return list(self.QUANTIZATION_SKIP_MODULES)

    def is_understanding_parameter(self, name: str) -> bool:
        # `embed_tokens` holds the shared visual-token interface itself: it stays frozen like Janus's aligners.
        return super().is_understanding_parameter(name) and "embed_tokens" not in name

    @property
    def mapping(self):
        return self.base_model.vocabulary_mapping

    def visual_token_ids(self, device=None) -> torch.Tensor:
        """The vocabulary ids of the visual tokens, sorted by codebook index."""
        return torch.tensor(self.mapping.image_tokens, dtype=torch.long, device=device)

    def site_mask(self, site):
        model = self.base_model
        generating = site == "generation"
        visual = self.visual_token_ids()
        largest = max(self.mapping.image_tokens)
        tables: dict[torch.device, torch.Tensor] = {}  # whether each id is a visual token, made once per device

        def mask(module, args, output):
            ids = args[0] if args else None
            if not isinstance(ids, torch.Tensor) or (model in _GENERATING) != generating:
                return torch.zeros(output.shape[:-1], dtype=torch.bool, device=output.device)
            # A lookup, not `torch.isin` (which sorts and reads back to the host) nor a copy per call: this runs at
            # every generated token.
            table = tables.get(ids.device)
            if table is None:
                table = tables[ids.device] = torch.zeros(largest + 2, dtype=torch.bool, device=ids.device)
                table[visual.to(ids.device)] = True
            return table[ids.clamp(0, len(table) - 1)]  # the last entry (never visual) stands for every larger id

        return mask

    def _chat_prompt(self, text: str) -> str:
        processor = self._require_processor()
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return f"USER: {processor.image_token}{text} ASSISTANT:"

    # ----------------------------------------------------------------------------------------------- understanding
    def _encode(self, images, questions):
        processor = self._require_processor()
        prompts = [self._chat_prompt(q) for q in questions]
        return processor(
            text=prompts, images=to_pil_images(images), return_tensors="pt", padding=True, padding_side="left"
        )

    def build_understanding_inputs(self, images, questions, answers):
        """Left-padded `input_ids`, `attention_mask`, `pixel_values`, `image_sizes` and `labels` (-100 except answer
        and EOS).

        Args:
            images: PIL images, or a float tensor `(B, 3, H, W)` in `[0, 1]`, or uint8 tensors.
            questions (`list[str]`): One question per image.
            answers (`list[str]`): One answer per image.
        """
        if not (len(images) == len(questions) == len(answers)):
            raise ValueError(
                f"Got {len(images)} images, {len(questions)} questions and {len(answers)} answers; they must match."
            )
        encoded = self._encode(images, questions)
        return append_answers(dict(encoded), answers, self._require_processor().tokenizer)

    def understanding_loss(self, model, inputs):
        return per_sample_answer_loss(
            model,
            inputs,
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(self.dtype),
            image_sizes=inputs["image_sizes"],
        )

    def _to_unit_range(self, pixels: torch.Tensor) -> torch.Tensor:
        image_processor = self._require_processor().image_processor
        mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float() * std + mean).clamp(0, 1)

    def concatenate_inputs(self, first, second):
        # Emu3 embeds every image's tokens as one flat run: a merged batch is split back into rows by counting tokens,
        # which needs one image size throughout (the processor pads `pixel_values` to the largest image, so equal
        # tensor shapes do not mean equal sizes).
        sizes = [batch["image_sizes"] for batch in (first, second) if "image_sizes" in batch]
        if sizes and torch.unique(torch.cat([torch.as_tensor(s).reshape(-1, 2) for s in sizes]), dim=0).shape[0] > 1:
            return None
        return super().concatenate_inputs(first, second)

    def source_images(self, inputs):
        pixels = inputs.get("pixel_values")
        if pixels is None or self.processor is None:
            return None
        return self._to_unit_range(pixels)

    @torch.no_grad()
    def answer(self, model, images, questions, max_new_tokens=16):
        inputs = self._encode(images, questions)
        device = self.device
        inputs = {k: v.to(device, self.dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
        return self._greedy_answers(model, inputs, max_new_tokens)

    # ----------------------------------------------------------------------------------------------- generation
    @property
    def generation_area(self) -> int:
        """Pixel area of generated images: the processor's `image_area` within the image processor's pixel range."""
        processor = self._require_processor()
        image_processor = processor.image_processor
        return min(max(processor.image_area, image_processor.min_pixels), image_processor.max_pixels)

    @torch.no_grad()
    def generate_images(
        self,
        prompts,
        num_images=1,
        guidance_scale=None,
        temperature=None,
        generator=None,
        image_size=None,
        compile_config=None,
        return_tokens=False,
    ):
        """Samples `num_images` images per prompt with classifier-free guidance (the unconditional branch sees an
        empty prompt) and a forced grammar: `w` visual tokens then an end-of-line token, for each of `h` rows. The
        codes are decoded by the VQ decoder; pixels come back in `[0, 1]` at the generation size (`generation_area`,
        or `image_size` squared, which the understanding path accepts as it is). With `return_tokens`, also the
        sampled tokens (vocabulary ids, end-of-line tokens included), `(pixels, tokens)`."""
        processor = self._require_processor()
        tokenizer = processor.tokenizer
        model = self.base_model
        loop, (height, width) = self._generation_loop(prompts, image_size)
        with self._generating():
            tokens = self._generate_image_tokens(
                **loop,
                num_images=num_images,
                guidance_scale=guidance_scale,
                temperature=temperature,
                generator=generator,
                compile_config=compile_config,
            )
        batch = tokens.shape[0]
        # `decode_image_tokens` drops the three closing tokens (end of frame, end of image, EOS) that `generate` emits.
        closing = [processor.eof_token, processor.image_end_token, tokenizer.eos_token]
        tail = torch.tensor(tokenizer.convert_tokens_to_ids(closing), device=self.device).expand(batch, -1)
        pixels = model.decode_image_tokens(image_tokens=torch.cat([tokens, tail], dim=1), height=height, width=width)
        pixels = self._to_unit_range(pixels)
        return (pixels, tokens) if return_tokens else pixels

    @contextlib.contextmanager
    def _generating(self):
        """Inside it, `embed_tokens` is the generation site (see [`~Emu3Interface.site_mask`])."""
        _GENERATING.add(self.base_model)
        try:
            yield
        finally:
            _GENERATING.discard(self.base_model)

    def _generation_loop(self, prompts: list[str], image_size: int | None) -> tuple[dict, tuple[int, int]]:
        """The arguments of the image-token loop (and of its teacher-forced pass) for `prompts`, and the token grid
        `(height, width)`: the prompts with an empty unconditional one, the visual-token scores, the fed-back
        embeddings through `embed_tokens`, and the forced end-of-line token after each row."""
        processor = self._require_processor()
        self.generation_grid(image_size)  # a clear error for a size the processor cannot make
        area = self.generation_area if image_size is None else image_size * image_size
        model = self.base_model
        device = self.device
        texts = list(prompts) + [""]  # the last row is the unconditional prompt
        enc = processor(
            text=texts,
            return_for_image_generation=True,
            ratio="1:1",
            image_area=area,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        height, width = (int(v) for v in enc["image_sizes"][0])
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        visual = self.visual_token_ids(device)
        eol_id = self.mapping.eol_token_id
        loop = dict(
            language_model=model.model.text_model,
            prompt=(ids[:-1], mask[:-1]),
            unconditional_prompt=(ids[-1:], mask[-1:]),
            num_tokens=height * (width + 1),
            image_scores=lambda hidden: model.lm_head(hidden)[:, visual],
            # Through `embed_tokens`, so that the generation site's hook sees each sampled token.
            embed_image_tokens=self.embed_tokens,
            candidate_ids=visual,
            forced_token=lambda i: eol_id if i % (width + 1) == width else None,
            tokens_per_row=width + 1,
        )
        return loop, (height, width)

    def image_token_log_probs(
        self, prompts, tokens, num_images=1, guidance_scale=None, temperature=None, image_size=None
    ):
        loop, _ = self._generation_loop(prompts, image_size)
        with self._generating():
            return self._image_token_log_probs(
                **loop, tokens=tokens, num_images=num_images, guidance_scale=guidance_scale, temperature=temperature
            )

    def generation_grid(self, image_size: int | None = None) -> int:
        """Side of the visual-token grid of square generated images of `image_size` pixels (of `generation_area` when
        `None`).

        Raises:
            ValueError: when `image_size` is not a multiple of the VQ spatial factor or its area is outside the image
                processor's pixel range.
        """
        factor = self.base_model.model.vqmodel.vision_spatial_factor
        if image_size is None:
            return round(math.sqrt(self.generation_area) / factor)
        image_processor = self._require_processor().image_processor
        low, high = image_processor.min_pixels, image_processor.max_pixels
        if image_size <= 0 or image_size % factor or not low <= image_size * image_size <= high:
            raise ValueError(
                f"`mining_image_size={image_size}` does not fit this Emu3: the side must be a multiple of the VQ "
                f"spatial factor {factor}, and its area within the image processor's [{low}, {high}] pixels."
            )
        return image_size // factor

    def tokens_per_image(self) -> int:
        """Tokens generated per image at the generation size (`h * (w + 1)` plus three closing tokens)."""
        side = self.generation_grid()
        return side * (side + 1) + 3
