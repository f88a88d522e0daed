"""A tiny random CLIP, the stand-in for the consistency model."""

from __future__ import annotations

from ._utils import build_and_reload, tiny_vision_config
from .janus import _janus_tokenizer


def tiny_clip_image_processor():
    """A `CLIPImageProcessorPil` for 16x16 images (the tiny CLIP's and the tiny LLaVA's)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_convert_rgb=True
    )


def tiny_clip(seed: int = 0, save_dir: str | None = None):
    """Returns `(model, processor)` of a tiny random CLIP, saved and loaded back with `from_pretrained`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = _janus_tokenizer()
    tokenizer.padding_side = "right"
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config=tiny_vision_config(),
        projection_dim=16,
    )
    processor = CLIPProcessor(image_processor=tiny_clip_image_processor(), tokenizer=tokenizer)
    return build_and_reload(CLIPModel, config, processor, seed, save_dir)
