"""Tiny random models of the other supported families (Emu3, LLaVA, Qwen2-VL, Idefics3, PaliGemma), each with its
real processor around a tokenizer trained here on the shapes corpus."""

from __future__ import annotations

from ._utils import bpe_tokenizer, build_and_reload, tiny_vision_config
from .clip import tiny_clip_image_processor
from .data import shapes_corpus


TINY_FAMILY_IMAGE_SIZE = 32


def _family_tokenizer(added: list[str], extra_special_tokens: dict[str, str] | None = None):
    """A small BPE tokenizer trained here on the tiny VQA corpus, with `added` special tokens after the learned ones
    (ids are taken from the tokenizer, never assumed)."""
    return bpe_tokenizer(
        shapes_corpus() + ["USER: ASSISTANT:", "0 1 2 3 4 5 6 7 8 9 *"],
        vocab_size=120,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        added_tokens=added,
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=extra_special_tokens,
    )


def _tiny_text_config(tokenizer, model_type: str = "llama", **overrides) -> dict:
    config = {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config.update(overrides)
    return config


def tiny_emu3(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `Emu3ForConditionalGeneration` (about 0.6M parameters) and a real
    `Emu3Processor`, written to a directory and loaded back with `from_pretrained`.

    Images are 32x32 pixels, 4x4 VQ codes of a 32-entry codebook (`<|visual token%06d|>` in the tokenizer), so an image
    is 20 tokens with its end-of-line tokens. The VQ downsamples by 8, as the processor assumes.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `Emu3ForConditionalGeneration.from_pretrained`.
    """
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    codebook_size = 32
    image_tokens = {
        "image_token": "<image>",
        "boi_token": "<|image start|>",
        "eoi_token": "<|image end|>",
        "image_wrapper_token": "<|image token|>",
        "eof_token": "<|extra_201|>",
    }
    added = [*image_tokens.values(), "<|extra_200|>"] + [f"<|visual token{i:06d}|>" for i in range(codebook_size)]
    tokenizer = _family_tokenizer(added, image_tokens)
    area = TINY_FAMILY_IMAGE_SIZE**2
    image_processor = Emu3ImageProcessor(
        min_pixels=area, max_pixels=area, spatial_factor=8, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    config = Emu3Config(
        text_config=_tiny_text_config(tokenizer, model_type="emu3_text_model", num_attention_heads=2),
        vq_config={
            "codebook_size": codebook_size,
            "embed_dim": 4,
            "latent_channels": 4,
            "temporal_downsample_factor": 1,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 2, 1],  # three downsamplings: 8x, as Emu3Processor assumes
            "num_res_blocks": 1,
            "hidden_size": 32,
            "attn_resolutions": [],
        },
        vocabulary_map=tokenizer.get_vocab(),
    )
    return build_and_reload(Emu3ForConditionalGeneration, config, processor, seed, save_dir, **from_pretrained_kwargs)


def tiny_llava(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `LlavaForConditionalGeneration` (CLIP vision tower, Llama LLM,
    16 visual tokens per image) and a real `LlavaProcessor`, written to a directory and loaded back.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `LlavaForConditionalGeneration.from_pretrained`.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _family_tokenizer(["<image>"], {"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=tiny_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    config = LlavaConfig(
        vision_config=tiny_vision_config(model_type="clip_vision_model"),
        text_config=_tiny_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return build_and_reload(LlavaForConditionalGeneration, config, processor, seed, save_dir, **from_pretrained_kwargs)


def _image_only_qwen2_vl_processor_class():
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """`Qwen2VLProcessor` without its video processor, which needs torchvision (not installable here); images,
        text and the placeholder expansion are `Qwen2VLProcessor`'s own."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def tiny_qwen2_vl(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `Qwen2VLForConditionalGeneration` (16 merged visual tokens per
    32x32 image) and its processor, written to a directory and loaded back.

    The processor is `Qwen2VLProcessor` with a real `Qwen2VLImageProcessorPil`, minus the video processor: that one
    needs torchvision, which this project does not depend on.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `Qwen2VLForConditionalGeneration.from_pretrained`.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = _family_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    area = TINY_FAMILY_IMAGE_SIZE**2
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=area, max_pixels=area, patch_size=4, temporal_patch_size=2, merge_size=2
    )
    processor = _image_only_qwen2_vl_processor_class()(image_processor=image_processor, tokenizer=tokenizer)
    text = _tiny_text_config(
        tokenizer,
        model_type="qwen2_vl_text",
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    return build_and_reload(
        Qwen2VLForConditionalGeneration, config, processor, seed, save_dir, **from_pretrained_kwargs
    )


def tiny_idefics3(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `Idefics3ForConditionalGeneration` (16 visual tokens per 32x32
    image, no image splitting) and a real `Idefics3Processor`, written to a directory and loaded back.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `Idefics3ForConditionalGeneration.from_pretrained`.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    size = TINY_FAMILY_IMAGE_SIZE
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    tokenizer = _family_tokenizer(added, {"image_token": "<image>"})
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": size}, max_image_size={"longest_edge": size}, do_image_splitting=False
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)
    config = Idefics3Config(
        vision_config=tiny_vision_config(image_size=size),
        text_config=_tiny_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,  # 8x8 patches, pixel-shuffled to 4x4 = 16 visual tokens
    )
    return build_and_reload(
        Idefics3ForConditionalGeneration, config, processor, seed, save_dir, **from_pretrained_kwargs
    )


def tiny_paligemma(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `PaliGemmaForConditionalGeneration` (SigLIP tower, Gemma LLM, 16
    visual tokens per 16x16 image) and a real `PaliGemmaProcessor`, written to a directory and loaded back.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `PaliGemmaForConditionalGeneration.from_pretrained`.
    """
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = _family_tokenizer(["<image>"], {"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    image_processor.image_seq_length = 16  # PaliGemmaProcessor reads it from the image processor
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = PaliGemmaConfig(
        vision_config=tiny_vision_config(model_type="siglip_vision_model", projection_dim=32),
        text_config=_tiny_text_config(tokenizer, model_type="gemma", head_dim=8, num_image_tokens=16),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
    )
    return build_and_reload(
        PaliGemmaForConditionalGeneration, config, processor, seed, save_dir, **from_pretrained_kwargs
    )
