"""The tiny Janus pretrained on the digit scans and shipped in the package, with the config and processor it was
trained with."""

from __future__ import annotations

from pathlib import Path

from ..digits import DIGITS_IMAGE_SIZE, digits_corpus
from .janus import _janus_config, _janus_processor, _janus_tokenizer


PRETRAINED_TINY_JANUS_DIR = Path(__file__).parent.parent / "assets" / "tiny_janus_digits"
#: The pretrained tiny Janus of each digits world (`trl_unigame.digits`): `frame` (digits fill the frame) and `canvas`
#: (digits of any size at any place, fine-tuned at one size and measured at the others).
PRETRAINED_TINY_JANUS_DIRS = {
    "frame": PRETRAINED_TINY_JANUS_DIR,
    "canvas": Path(__file__).parent.parent / "assets" / "tiny_janus_digits_canvas",
}


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


def pretrained_tiny_janus_path(world: str = "frame") -> str:
    """Path of a pretrained tiny digits Janus shipped in the package (config, weights and processor).

    Args:
        world (`str`, *optional*, defaults to `"frame"`):
            `"frame"` (digits fill the frame) or `"canvas"` (digits of any size at any place).
    """
    if world not in PRETRAINED_TINY_JANUS_DIRS:
        raise ValueError(f"Unknown digits world {world!r}; choose one of {list(PRETRAINED_TINY_JANUS_DIRS)}.")
    return str(PRETRAINED_TINY_JANUS_DIRS[world])


def pretrained_tiny_janus(world: str = "frame", **from_pretrained_kwargs):
    """Returns `(model, processor)`: the tiny Janus pretrained on the digits (`scripts/pretrain_tiny_janus.py`).

    It answers "What digit is this?" and "What color is the digit?" about 16x16 renders of the digit scans and
    generates them from captions such as "a red seven" (see `docs/tiny_model.md` for its measured quality).

    Args:
        world (`str`, *optional*, defaults to `"frame"`):
            `"frame"`, the first model, or `"canvas"`, the model of the world where a digit can have any size and
            place (`scripts/pretrain_tiny_janus.py --world canvas`).
        **from_pretrained_kwargs:
            Passed to `JanusForConditionalGeneration.from_pretrained` (e.g. `dtype`, `quantization_config`).
    """
    from transformers import JanusForConditionalGeneration, JanusProcessor

    path = pretrained_tiny_janus_path(world)
    model = JanusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
    return model, JanusProcessor.from_pretrained(path)
