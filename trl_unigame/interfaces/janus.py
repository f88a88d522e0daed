"""Shared visual-token interface of Janus and Janus-Pro (`transformers.JanusForConditionalGeneration`)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..game.sharding import zero3_gathered
from .base import VisualTokenInterface, register_interface, to_pil_images, unwrap_model


_LLM_PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


@register_interface
class JanusInterface(VisualTokenInterface):
    """Janus / Janus-Pro.

    - Understanding site: `model.aligner`, whose output (vision features projected to the LLM's width) is scattered
      into the LLM's input embeddings at the image placeholder positions.
    - Generation site: `model.generation_aligner`, which maps the codebook embedding of each sampled image token to
      the LLM's width before it is fed back.
    """

    family = "janus (JanusForConditionalGeneration: Janus, Janus-Pro-1B, Janus-Pro-7B)"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        from transformers import JanusForConditionalGeneration

        return isinstance(model, JanusForConditionalGeneration)

    @property
    def config(self):
        return self.base_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def understanding_site(self) -> nn.Module:
        return self.base_model.model.aligner

    @property
    def generation_site(self) -> nn.Module:
        return self.base_model.model.generation_aligner

    @property
    def lora_target_modules(self) -> str:
        return rf".*language_model\..*\.({_LLM_PROJECTIONS})"

    #: Kept out of 4-bit quantization: the small generation projections, the VQ model and the LM head.
    QUANTIZATION_SKIP_MODULES = ("model.generation_aligner", "model.generation_head", "lm_head", "model.vqmodel")

    @property
    def frozen_eval_modules(self) -> list[nn.Module]:
        return [self.base_model.model.vqmodel]

    @property
    def quantization_skip_modules(self) -> list[str]:
        return list(self.QUANTIZATION_SKIP_MODULES)

    @property
    def num_image_tokens(self) -> int:
        return self.config.vision_config.num_image_tokens

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    def _chat_prompt(self, text: str, with_image: bool) -> str:
        processor = self._require_processor()
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        image = f"{processor.image_token}\n" if with_image else ""
        return f"<|User|>: {image}{text}\n\n<|Assistant|>:"

    # ----------------------------------------------------------------------------------------------- understanding
    def build_understanding_inputs(self, images, questions, answers):
        """Left-padded `input_ids`, `attention_mask`, `pixel_values` and `labels` (-100 except answer and EOS).

        Args:
            images: PIL images, or a float tensor `(B, 3, H, W)` in `[0, 1]`, or uint8 tensors.
            questions (`list[str]`): One question per image.
            answers (`list[str]`): One answer per image.
        """
        if not (len(images) == len(questions) == len(answers)):
            raise ValueError(
                f"Got {len(images)} images, {len(questions)} questions and {len(answers)} answers; they must match."
            )
        processor = self._require_processor()
        tokenizer = processor.tokenizer
        prompts = [self._chat_prompt(q, with_image=True) for q in questions]
        encoded = processor(text=prompts, images=to_pil_images(images), return_tensors=None, padding=False)
        sequences, label_rows = [], []
        for prompt_ids, answer in zip(encoded["input_ids"], answers):
            answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [tokenizer.eos_token_id]
            sequences.append(list(prompt_ids) + answer_ids)
            label_rows.append([-100] * len(prompt_ids) + answer_ids)
        length = max(len(s) for s in sequences)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, (seq, lab) in enumerate(zip(sequences, label_rows)):
            input_ids[i, length - len(seq) :] = torch.tensor(seq)
            labels[i, length - len(seq) :] = torch.tensor(lab)
            attention_mask[i, length - len(seq) :] = 1
        pixel_values = torch.from_numpy(np.stack([np.asarray(p) for p in encoded["pixel_values"]]))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "labels": labels,
        }

    def understanding_loss(self, model, inputs):
        labels = inputs["labels"]
        # Left padding puts every answer at the end: only the last positions need logits.
        answer_span = int((labels != -100).int().argmax(-1).min().item()) if labels.numel() else 0
        keep = labels.shape[1] - answer_span + 1
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"].to(self.dtype),
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = outputs.logits[:, :-1].float()
        targets = labels[:, -(keep - 1) :]
        token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counts = (targets != -100).sum(-1).clamp(min=1)
        return token_loss.sum(-1) / counts

    def _generation_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids (ending with the begin-of-image token) and attention mask of generation prompts."""
        processor = self._require_processor()
        texts = [self._chat_prompt(p, with_image=False) for p in prompts]
        enc = processor(text=texts, generation_mode="image", return_tensors="pt", padding=True, padding_side="left")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generation_loss(self, model, prompts, images):
        """Per-sample next-image-token cross-entropy of generating `images` (`[0, 1]`, `(B, 3, H, W)`) from `prompts`:
        the images' VQ codes are the targets, fed back through the generation embeddings as in generation."""
        base = self.base_model
        vq = base.model.vqmodel
        grid = int(round(self.num_image_tokens**0.5))
        size = grid * 2 ** (len(vq.config.channel_multiplier) - 1)
        pixels = images.to(device=self.device, dtype=self.dtype)
        if pixels.shape[-1] != size:
            pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True).to(self.dtype)
        # the frozen VQ encoder reads its codebook's weight directly: under ZeRO-3 its parameters are gathered first
        with torch.no_grad(), zero3_gathered(vq):
            targets = vq.encode(pixels * 2 - 1).image_tokens.view(len(pixels), -1)
        prompt_ids, prompt_mask = self._generation_prompt(prompts)
        embeds = torch.cat(
            [
                base.get_input_embeddings()(prompt_ids),
                base.prepare_embeddings_for_image_generation(targets[:, :-1]),
            ],
            dim=1,
        )
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(targets[:, :-1].shape)], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = base.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        logits = base.model.generation_head(hidden[:, prompt_ids.shape[1] - 1 :]).float()
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return ce.mean(-1)

    def source_images(self, inputs):
        pixels = inputs.get("pixel_values")
        if pixels is None or self.processor is None:
            return None
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float() * std + mean).clamp(0, 1)

    def _text_generate(self, model):
        """`JanusForConditionalGeneration.generate` hands text generation to `GenerationMixin.generate` with a
        generation config and `guidance_scale=None` (so that image guidance does not act on text) together, which
        transformers warns is deprecated. The same call made directly, every argument explicit and no config object,
        gives the same tokens without the warning; LoRA layers and forward hooks live in the modules, so they act
        the same."""
        from transformers import GenerationMixin

        base = unwrap_model(model)
        return functools.partial(GenerationMixin.generate, base, guidance_scale=None)

    @torch.no_grad()
    def answer(self, model, images, questions, max_new_tokens=16):
        """Greedy answers, batched; a forward hook on `understanding_site` (a perturber, an attack) acts on them."""
        processor = self._require_processor()
        prompts = [self._chat_prompt(q, with_image=True) for q in questions]
        # Left padding whatever the tokenizer's default: the answers are read after the last prompt position.
        inputs = processor(
            text=prompts, images=to_pil_images(images), return_tensors="pt", padding=True, padding_side="left"
        )
        device = self.device
        inputs = {k: v.to(device, self.dtype) if k == "pixel_values" else v.to(device) for k, v in inputs.items()}
        return self._greedy_answers(model, inputs, max_new_tokens)

    # ----------------------------------------------------------------------------------------------- generation
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
        grid = self.generation_grid(image_size)
        tokens = self._generate_image_tokens(
            **self._generation_loop(prompts, grid),
            num_images=num_images,
            guidance_scale=guidance_scale,
            temperature=temperature,
            generator=generator,
            compile_config=compile_config,
        )
        pixels = self._decode(tokens, grid)
        pixels = ((pixels + 1) / 2).clamp(0, 1)
        if pixels.shape[-1] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        pixels = pixels.clamp(0, 1)
        return (pixels, tokens) if return_tokens else pixels

    def _generation_loop(self, prompts: list[str], grid: int) -> dict:
        """The arguments of the image-token loop (and of its teacher-forced pass) for `prompts` on a `grid` x `grid`
        token grid: the prompts, their unconditional twins (only BOS and BOI kept), the head and the fed-back
        embeddings."""
        processor = self._require_processor()
        model = self.base_model
        tokenizer = processor.tokenizer
        gen_config = model.generation_config
        pad_id = gen_config.pad_token_id if gen_config.pad_token_id is not None else tokenizer.pad_token_id
        bos_id = gen_config.bos_token_id if gen_config.bos_token_id is not None else tokenizer.bos_token_id
        boi_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
        ids, mask = self._generation_prompt(prompts)
        # Classifier-free guidance: the unconditional prompt keeps only BOS and BOI.
        uncond_ids = ids.masked_fill((ids != bos_id) & (ids != boi_id), pad_id)
        return dict(
            language_model=model.model.language_model,
            prompt=(ids, mask),
            unconditional_prompt=(uncond_ids, mask),
            num_tokens=grid * grid,
            tokens_per_row=grid,
            image_scores=model.model.generation_head,
            embed_image_tokens=model.prepare_embeddings_for_image_generation,
        )

    def image_token_log_probs(
        self, prompts, tokens, num_images=1, guidance_scale=None, temperature=None, image_size=None
    ):
        grid = self.generation_grid(image_size)
        return self._image_token_log_probs(
            **self._generation_loop(prompts, grid),
            tokens=tokens,
            num_images=num_images,
            guidance_scale=guidance_scale,
            temperature=temperature,
        )

    @property
    def _vq_downsample(self) -> int:
        """Pixels per VQ code along each side (16 for Janus-Pro: 384 px on a 24 x 24 grid)."""
        return 2 ** (len(self.base_model.model.vqmodel.config.channel_multiplier) - 1)

    def generation_grid(self, image_size: int | None = None) -> int:
        """Side of the image-token grid for generated images of `image_size` pixels (the model's own grid when
        `None`): Janus-Pro-1B/7B generate 24 x 24 tokens for 384 px, and 16 x 16 for `image_size=256`.

        Raises:
            ValueError: when `image_size` is not a positive multiple of the VQ downsampling factor, or exceeds the
                model's own generation size.
        """
        native = int(round(self.num_image_tokens**0.5))
        if image_size is None:
            return native
        factor = self._vq_downsample
        if image_size <= 0 or image_size % factor or image_size // factor > native:
            raise ValueError(
                f"`mining_image_size={image_size}` does not fit {type(self.base_model).__name__}: its VQ decoder makes "
                f"{factor} pixels per image token, on at most a {native} x {native} grid ({native * factor} px). Use a "
                f"multiple of {factor} up to {native * factor}, e.g. {max(factor, (2 * native // 3) * factor)}, or "
                "`None` for the model's own size."
            )
        return image_size // factor

    def _decode(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        """VQ-decodes `(B, grid * grid)` image tokens to pixels in `[-1, 1]`, `(B, 3, grid * f, grid * f)`; the VQ
        decoder is convolutional, so a smaller grid decodes to a smaller image."""
        quantize = self.base_model.model.vqmodel.quantize
        native = list(quantize.quant_state_dims)
        quantize.quant_state_dims = [grid, grid]  # the shape `decode` checks and reshapes to
        try:
            return self.base_model.decode_image_tokens(tokens).permute(0, 3, 1, 2).float()
        finally:
            quantize.quant_state_dims = native
