"""The tiny random Janus with a real processor, and the configs of Janus-Pro's real shapes."""

from __future__ import annotations

from ._utils import bpe_tokenizer, checkpoint_dir, forget_temporary_folder, seeded_model, write_checkpoint
from .data import shapes_corpus


IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
TINY_IMAGE_SIZE = 16
TINY_NUM_IMAGE_TOKENS = 16

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image_placeholder>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}\n\n{% else %}<|end_of_sentence|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def _janus_config(
    vocab_size: int,
    image_token_id: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 1,
    vision_heads: int = 2,
    codebook_size: int = 64,
    channel_multiplier: tuple[int, ...] = (1, 1, 1),
):
    """A small `JanusConfig` with every sub-config set (the default one is inconsistent): 16x16 images in 16 patches,
    8-dim VQ codes on a 4x4 grid. The defaults are the tiny random Janus's."""
    from transformers import JanusConfig

    text_config = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    vision_config = {
        "hidden_size": vision_hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": vision_heads,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 4,
        "projection_dim": hidden_size,
        "mlp_ratio": 2.0,
        "num_image_tokens": TINY_NUM_IMAGE_TOKENS,
    }
    vq_config = {
        "embed_dim": 8,
        "num_embeddings": codebook_size,
        "latent_channels": 32,
        "base_channels": 32,
        "channel_multiplier": list(channel_multiplier),
        "num_res_blocks": 1,
        "projection_dim": hidden_size,
        "image_token_embed_dim": hidden_size,
        "num_patches": 4,
    }
    return JanusConfig(
        text_config=text_config, vision_config=vision_config, vq_config=vq_config, image_token_id=image_token_id
    )


#: The language-model shapes of Janus-Pro (DeepSeek-LLM): hidden size, layers, MLP width, attention heads.
JANUS_PRO_SHAPES = {"1b": (2048, 24, 5632, 16), "7b": (4096, 30, 11008, 32)}


def janus_pro_config(size: str = "1b", image_token_id: int = 100581):
    """The `JanusConfig` of Janus-Pro-1B or -7B's architecture (random weights once built; nothing is downloaded):
    the DeepSeek-LLM of `JANUS_PRO_SHAPES`, a SigLIP-L/16 vision tower at 384 px (576 image tokens), and the VQ
    model generating on a 24 x 24 grid. Build it on the meta device to count parameters, or on a GPU to time steps.

    Args:
        size (`str`, *optional*, defaults to `"1b"`): `"1b"` or `"7b"`.
        image_token_id (`int`, *optional*, defaults to `100581`):
            Id of the image placeholder token (that of the processor the model will be used with).
    """
    from transformers import JanusConfig

    if size not in JANUS_PRO_SHAPES:
        raise ValueError(f"Unknown Janus-Pro size {size!r}: use one of {sorted(JANUS_PRO_SHAPES)}.")
    hidden, layers, intermediate, heads = JANUS_PRO_SHAPES[size]
    return JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": 102400,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": intermediate,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 16384,
        },
        vision_config={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 16,
            "projection_dim": hidden,
            "num_image_tokens": 576,
        },
        vq_config={"projection_dim": hidden, "image_token_embed_dim": hidden, "num_patches": 24},
        image_token_id=image_token_id,
    )


def tiny_janus_config(vocab_size: int = 128, hidden_size: int = 32):
    """Returns the `JanusConfig` of a tiny random Janus (about 360k parameters) that runs on CPU in milliseconds.

    `hidden_size` is the LLM's width (64 or more lets bitsandbytes quantize the LLM's layers on CPU).
    """
    return _janus_config(vocab_size, image_token_id=vocab_size - 3, hidden_size=hidden_size)


def _janus_tokenizer(vocab_size: int = 128, corpus: list[str] | None = None):
    """A BPE tokenizer of Janus's special tokens, trained on `corpus` (the shapes corpus when not given)."""
    image_specials = [IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN]
    tokenizer = bpe_tokenizer(
        corpus if corpus is not None else shapes_corpus(),
        vocab_size=vocab_size - len(image_specials),
        special_tokens=["<pad>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<unk>", "<|User|>", "<|Assistant|>"],
        # The image tokens take the last three ids, so that `image_token_id` = vocab_size - 3 as in the config.
        added_tokens=image_specials,
        bos_token="<|begin_of_sentence|>",
        eos_token="<|end_of_sentence|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
    )
    # The BPE trainer stops early on a small corpus: the image tokens are the last three ids of what it made.
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == len(tokenizer) - 3, (
        "tiny tokenizer has an unexpected layout"
    )
    return tokenizer


def _janus_processor(
    tokenizer, save_dir: str | None = None, image_size: int = TINY_IMAGE_SIZE, **image_processor_kwargs
):
    """A real `JanusProcessor` around `tokenizer`, written to `save_dir` and loaded back with `from_pretrained`."""
    from transformers import JanusImageProcessorPil, JanusProcessor

    image_processor = JanusImageProcessorPil(
        size={"height": image_size, "width": image_size}, min_size=4, **image_processor_kwargs
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=TINY_NUM_IMAGE_TOKENS,
    )
    with checkpoint_dir(save_dir) as path:
        processor.save_pretrained(path)
        return JanusProcessor.from_pretrained(path)


def tiny_janus_processor(save_dir: str | None = None):
    """Builds a real `JanusProcessor` offline (BPE tokenizer trained here) and loads it back with `from_pretrained`."""
    return _janus_processor(_janus_tokenizer(), save_dir)


def save_tiny_janus(save_dir: str, seed: int = 0, hidden_size: int = 32) -> str:
    """Writes a tiny random Janus checkpoint and its processor to `save_dir` (a stand-in for a Hub checkpoint)."""
    from transformers import JanusForConditionalGeneration

    tokenizer = tiny_janus_processor(save_dir).tokenizer
    config = tiny_janus_config(vocab_size=len(tokenizer), hidden_size=hidden_size)
    boi_token_id = tokenizer.convert_tokens_to_ids(BOI_TOKEN)
    model = seeded_model(JanusForConditionalGeneration, config, seed, tokenizer, boi_token_id=boi_token_id)
    write_checkpoint(model, save_dir)
    return save_dir


def tiny_janus(seed: int = 0, save_dir: str | None = None, hidden_size: int = 32, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `JanusForConditionalGeneration` and a real `JanusProcessor`.

    Both are written to a directory and loaded back with `from_pretrained`, as a real checkpoint would be.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random weights.
        save_dir (`str`, *optional*):
            Where to write the checkpoint; a temporary directory when not given.
        hidden_size (`int`, *optional*, defaults to `32`):
            Width of the LLM (and so of the shared visual-token space).
        **from_pretrained_kwargs:
            Passed to `JanusForConditionalGeneration.from_pretrained` (e.g. `quantization_config`, `dtype`).
    """
    from transformers import JanusForConditionalGeneration, JanusProcessor

    with checkpoint_dir(save_dir) as path:
        save_tiny_janus(path, seed=seed, hidden_size=hidden_size)
        model = JanusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
        return forget_temporary_folder(model, save_dir), JanusProcessor.from_pretrained(path)
