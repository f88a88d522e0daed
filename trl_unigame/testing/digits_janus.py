"""The tiny Janus pretrained on the digit scans and shipped in the package, with the config and processor it was
trained with."""

from __future__ import annotations

from pathlib import Path

from ..digits import DIGITS_IMAGE_SIZE, digits_corpus
from .janus import _janus_config, _janus_processor, _janus_tokenizer


PRETRAINED_TINY_JANUS_DIR = Path(__file__).parent.parent / "assets" / "tiny_janus_digits"


def digits_janus_processor(save_dir: str | None = None):
    """Builds the `JanusProcessor` of the digits model offline (a BPE tokenizer trained on [`digits_corpus`]) and loads it
    back with `from_pretrained`. Pixels are normalised to `[-1, 1]`, the range of the VQ decoder.

    Args:
        save_dir (`str`, *optional*):
            Where to write it; a temporary directory when not given.
    """
    # The chat template's own characters (": ", new lines) must be in the alphabet too, or they become <unk>.
    corpus = digits_corpus() + ["<|User|>: \n\n<|Assistant|>:", ". , : ; ! ? ' - ( )"]
    return _janus_processor(
        _janus_tokenizer(vocab_size=512, corpus=corpus),
        save_dir,
        image_size=DIGITS_IMAGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def digits_janus_config(vocab_size: int, image_token_id: int):
    """Returns the `JanusConfig` of the tiny digits Janus (about 1.6M parameters).

    LLM: hidden 128, 3 layers. Vision encoder: hidden 64, 2 layers, 16x16 images in 4x4 patches (16 tokens). VQ: 256
    codes of dimension 8 on a 4x4 latent grid (channels 32, multiplier `[1, 1, 2]`).

    Args:
        vocab_size (`int`):
            Size of the tokenizer (`len(tokenizer)`).
        image_token_id (`int`):
            Id of the image placeholder token.
    """
    return _janus_config(
        vocab_size,
        image_token_id=image_token_id,
        hidden_size=128,
        num_layers=3,
        vision_hidden_size=64,
        vision_layers=2,
        vision_heads=4,
        codebook_size=256,
        channel_multiplier=[1, 1, 2],
    )


def pretrained_tiny_janus_path() -> str:
    """Path of the pretrained tiny digits Janus shipped in the package (config, weights and processor)."""
    return str(PRETRAINED_TINY_JANUS_DIR)


def pretrained_tiny_janus(**from_pretrained_kwargs):
    """Returns `(model, processor)`: the tiny Janus pretrained on the digits (`scripts/pretrain_tiny_janus.py`).

    It answers "What digit is this?" and "What color is the digit?" about 16x16 renders of the digit scans and
    generates them from captions such as "a red seven" (see `docs/tiny_model.md` for its measured quality).

    Args:
        **from_pretrained_kwargs:
            Passed to `JanusForConditionalGeneration.from_pretrained` (e.g. `dtype`, `quantization_config`).
    """
    from transformers import JanusForConditionalGeneration, JanusProcessor

    path = pretrained_tiny_janus_path()
    model = JanusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    return model, JanusProcessor.from_pretrained(path)
