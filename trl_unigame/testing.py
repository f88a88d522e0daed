"""Offline fixtures: a tiny random Janus with a real processor, a tiny CLIP and a learnable synthetic VQA dataset.

Everything here is built from configurations in code and loaded back through the same `from_pretrained` path a
user takes with a real checkpoint, so tests and the offline example exercise the real loading code without a Hub.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .digit_judge import DigitJudge
from .digits import DIGITS_IMAGE_SIZE, digits_corpus, digits_vqa_dataset


__all__ = [
    "DigitJudge",
    "digits_janus_config",
    "digits_janus_processor",
    "digits_vqa_dataset",
    "pretrained_tiny_janus",
    "pretrained_tiny_janus_path",
    "save_tiny_janus",
    "tiny_clip",
    "tiny_emu3",
    "tiny_idefics3",
    "tiny_janus",
    "tiny_janus_config",
    "tiny_janus_processor",
    "tiny_llava",
    "tiny_paligemma",
    "tiny_qwen2_vl",
    "tiny_vqa_dataset",
]


IMAGE_TOKEN = "<image_placeholder>"
BOI_TOKEN = "<begin_of_image>"
EOI_TOKEN = "<end_of_image>"
TINY_IMAGE_SIZE = 16
TINY_NUM_IMAGE_TOKENS = 16
# Shapes and colours drawn by `tiny_vqa_dataset`; every answer is a single word of this vocabulary.
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "circle", "triangle")

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


def _corpus() -> list[str]:
    words = list(COLORS) + list(SHAPES)
    lines = []
    for color in COLORS:
        for shape in SHAPES:
            lines += [
                f"What color is the {shape}? {color}",
                f"What shape is shown? {shape}",
                f"A {color} {shape} on a white background.",
                f"Is there a {color} {shape}? yes no",
            ]
    lines += [" ".join(words), "<|User|>: \n\n<|Assistant|>:"]
    return lines


def _janus_config(
    vocab_size: int,
    image_token_id: int,
    hidden_size: int,
    num_layers: int,
    vision_hidden_size: int,
    vision_layers: int,
    vision_heads: int,
    codebook_size: int,
    channel_multiplier: list[int],
):
    """A small `JanusConfig` with every sub-config set (the default one is inconsistent): 16x16 images in 16 patches,
    8-dim VQ codes on a 4x4 grid."""
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
    return _janus_config(
        vocab_size,
        image_token_id=vocab_size - 3,
        hidden_size=hidden_size,
        num_layers=2,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
        codebook_size=64,
        channel_multiplier=[1, 1, 1],
    )


def _build_tokenizer(save_dir: str, vocab_size: int = 128, corpus: list[str] | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<unk>", "<|User|>", "<|Assistant|>"]
    image_specials = [IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(image_specials), special_tokens=specials, show_progress=False
    )
    tokenizer.train_from_iterator(corpus if corpus is not None else _corpus(), trainer=trainer)
    # The image tokens take the last three ids, so that `image_token_id` = vocab_size - 3 as in the config.
    tokenizer.add_special_tokens(image_specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_sentence|>",
        unk_token="<unk>",
        eos_token="<|end_of_sentence|>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        padding_side="left",
    )
    # The BPE trainer stops early on a small corpus: the image tokens are the last three ids of what it made.
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == len(fast) - 3, "tiny tokenizer has an unexpected layout"
    fast.save_pretrained(save_dir)
    return fast


def tiny_janus_processor(save_dir: str | None = None):
    """Builds a real `JanusProcessor` offline (BPE tokenizer trained here) and loads it back with `from_pretrained`."""
    from transformers import JanusImageProcessorPil, JanusProcessor

    with tempfile.TemporaryDirectory() as tmp:
        save_dir = save_dir or tmp
        tokenizer = _build_tokenizer(save_dir)
        image_processor = JanusImageProcessorPil(
            size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, min_size=4
        )
        processor = JanusProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            num_image_tokens=TINY_NUM_IMAGE_TOKENS,
        )
        processor.save_pretrained(save_dir)
        return JanusProcessor.from_pretrained(save_dir)


def save_tiny_janus(save_dir: str, seed: int = 0, hidden_size: int = 32) -> str:
    """Writes a tiny random Janus checkpoint and its processor to `save_dir` (a stand-in for a Hub checkpoint)."""
    from transformers import GenerationConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    processor = tiny_janus_processor(save_dir)
    config = tiny_janus_config(vocab_size=len(processor.tokenizer), hidden_size=hidden_size)
    model = JanusForConditionalGeneration(config)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generation_kwargs={"boi_token_id": tok.convert_tokens_to_ids(BOI_TOKEN)},
    )
    # Written file by file (not `model.save_pretrained`, which writes on rank 0 only) so that every process of a
    # distributed test can build its own copy; the layout is the one `from_pretrained` reads.
    from safetensors.torch import save_model

    model.config.save_pretrained(save_dir)
    model.generation_config.save_pretrained(save_dir)
    save_model(model, os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})
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

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_janus(save_dir or tmp, seed=seed, hidden_size=hidden_size)
        model = JanusForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
        processor = JanusProcessor.from_pretrained(path)
    return model, processor


def draw_shape(color: str, shape: str, size: int = 32) -> Image.Image:
    """Draws one filled `shape` in `color` on a white square image."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    m = size // 6
    box = (m, m, size - m, size - m)
    fill = COLORS[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=fill)
    return image


def tiny_vqa_dataset(n: int = 32, seed: int = 0, image_size: int = 32):
    """Returns a `datasets.Dataset` of drawn shapes with columns `image`, `question`, `answer` and `caption`.

    The image determines the answer (its colour or its shape), so a model can learn the task.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    rows = {"image": [], "question": [], "answer": [], "caption": []}
    colors = list(COLORS)
    for _ in range(n):
        color = colors[rng.integers(len(colors))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        rows["image"].append(draw_shape(color, shape, image_size))
        if rng.random() < 0.5:
            rows["question"].append(f"What color is the {shape}?")
            rows["answer"].append(color)
        else:
            rows["question"].append("What shape is shown?")
            rows["answer"].append(shape)
        rows["caption"].append(f"A {color} {shape} on a white background.")
    features = Features(
        {"image": ImageFeature(), "question": Value("string"), "answer": Value("string"), "caption": Value("string")}
    )
    return Dataset.from_dict(rows, features=features)


def tiny_clip(seed: int = 0, save_dir: str | None = None):
    """Returns `(model, processor)` of a tiny random CLIP, saved and loaded back with `from_pretrained`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        tokenizer = _build_tokenizer(path)
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
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
            },
            projection_dim=16,
        )
        torch.manual_seed(seed)
        clip = CLIPModel(config)
        clip.config.save_pretrained(path)
        from safetensors.torch import save_model

        save_model(clip, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_convert_rgb=True
        )
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
        return CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)


# --------------------------------------------------------------------------------------------- other model families
TINY_FAMILY_IMAGE_SIZE = 32


def _family_tokenizer(save_dir: str, added: list[str], extra_special_tokens: dict[str, str] | None = None):
    """A small BPE tokenizer trained here on the tiny VQA corpus, with `added` special tokens after the learned ones
    (ids are taken from the tokenizer, never assumed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(_corpus() + ["USER: ASSISTANT:", "0 1 2 3 4 5 6 7 8 9 *"], trainer=trainer)
    tokenizer.add_special_tokens(added)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
    )
    fast.save_pretrained(save_dir)
    return fast


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


def _save_and_reload(model, processor, save_dir: str, model_cls, processor_cls, **from_pretrained_kwargs):
    from safetensors.torch import save_model
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    processor.save_pretrained(save_dir)
    model.config.save_pretrained(save_dir)
    model.generation_config.save_pretrained(save_dir)
    save_model(model, os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})
    return model_cls.from_pretrained(save_dir, **from_pretrained_kwargs), processor_cls.from_pretrained(save_dir)


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
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        tokenizer = _family_tokenizer(path, added, image_tokens)
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
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config)
        return _save_and_reload(
            model, processor, path, Emu3ForConditionalGeneration, Emu3Processor, **from_pretrained_kwargs
        )


def tiny_llava(seed: int = 0, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a tiny random `LlavaForConditionalGeneration` (CLIP vision tower, Llama LLM,
    16 visual tokens per image) and a real `LlavaProcessor`, written to a directory and loaded back.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the random weights.
        save_dir (`str`, *optional*): Where to write the checkpoint; a temporary directory when not given.
        **from_pretrained_kwargs: Passed to `LlavaForConditionalGeneration.from_pretrained`.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        tokenizer = _family_tokenizer(path, ["<image>"], {"image_token": "<image>"})
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_convert_rgb=True
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        )
        config = LlavaConfig(
            vision_config={
                "model_type": "clip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
            },
            text_config=_tiny_text_config(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        return _save_and_reload(
            model, processor, path, LlavaForConditionalGeneration, LlavaProcessor, **from_pretrained_kwargs
        )


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

    processor_cls = _image_only_qwen2_vl_processor_class()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        tokenizer = _family_tokenizer(path, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
        area = TINY_FAMILY_IMAGE_SIZE**2
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=area, max_pixels=area, patch_size=4, temporal_patch_size=2, merge_size=2
        )
        processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer)
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
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
        return _save_and_reload(
            model, processor, path, Qwen2VLForConditionalGeneration, processor_cls, **from_pretrained_kwargs
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
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
        tokenizer = _family_tokenizer(path, added, {"image_token": "<image>"})
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": size}, max_image_size={"longest_edge": size}, do_image_splitting=False
        )
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16)
        config = Idefics3Config(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": size,
                "patch_size": 4,
            },
            text_config=_tiny_text_config(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,  # 8x8 patches, pixel-shuffled to 4x4 = 16 visual tokens
        )
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
        return _save_and_reload(
            model, processor, path, Idefics3ForConditionalGeneration, Idefics3Processor, **from_pretrained_kwargs
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

    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        tokenizer = _family_tokenizer(path, ["<image>"], {"image_token": "<image>"})
        image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
        image_processor.image_seq_length = 16  # PaliGemmaProcessor reads it from the image processor
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        config = PaliGemmaConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 16,
                "patch_size": 4,
                "projection_dim": 32,
            },
            text_config=_tiny_text_config(tokenizer, model_type="gemma", head_dim=8, num_image_tokens=16),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            projection_dim=32,
        )
        torch.manual_seed(seed)
        model = PaliGemmaForConditionalGeneration(config)
        return _save_and_reload(
            model, processor, path, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, **from_pretrained_kwargs
        )


# ---------------------------------------------------------------------------------------------------- pretrained digits
PRETRAINED_TINY_JANUS_DIR = Path(__file__).parent / "assets" / "tiny_janus_digits"


def digits_janus_processor(save_dir: str | None = None):
    """Builds the `JanusProcessor` of the digits model offline (a BPE tokenizer trained on [`digits_corpus`]) and loads it
    back with `from_pretrained`. Pixels are normalised to `[-1, 1]`, the range of the VQ decoder.

    Args:
        save_dir (`str`, *optional*):
            Where to write it; a temporary directory when not given.
    """
    from transformers import JanusImageProcessorPil, JanusProcessor

    with tempfile.TemporaryDirectory() as tmp:
        save_dir = save_dir or tmp
        # The chat template's own characters (": ", new lines) must be in the alphabet too, or they become <unk>.
        corpus = digits_corpus() + ["<|User|>: \n\n<|Assistant|>:", ". , : ; ! ? ' - ( )"]
        tokenizer = _build_tokenizer(save_dir, vocab_size=512, corpus=corpus)
        image_processor = JanusImageProcessorPil(
            size={"height": DIGITS_IMAGE_SIZE, "width": DIGITS_IMAGE_SIZE},
            min_size=4,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        processor = JanusProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            num_image_tokens=TINY_NUM_IMAGE_TOKENS,
        )
        processor.save_pretrained(save_dir)
        return JanusProcessor.from_pretrained(save_dir)


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
