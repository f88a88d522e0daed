"""Offline fixtures: a tiny random Janus with a real processor, the tiny models of the other families, a tiny CLIP, a
learnable synthetic VQA dataset and the pretrained tiny digits Janus.

Everything here is built from configurations in code and loaded back through the same `from_pretrained` path a
user takes with a real checkpoint, so tests and the offline example exercise the real loading code without a Hub.
"""

from ..digit_judge import DigitJudge
from ..digits import DIGITS_IMAGE_SIZE, digits_corpus, digits_vqa_dataset
from .clip import tiny_clip
from .data import COLORS, SHAPES, draw_shape, tiny_vqa_dataset
from .digits_janus import (
    PRETRAINED_TINY_JANUS_DIR,
    PRETRAINED_TINY_JANUS_DIRS,
    digits_janus_config,
    digits_janus_processor,
    pretrained_tiny_janus,
    pretrained_tiny_janus_path,
)
from .families import TINY_FAMILY_IMAGE_SIZE, tiny_emu3, tiny_idefics3, tiny_llava, tiny_paligemma, tiny_qwen2_vl
from .janus import (
    BOI_TOKEN,
    CHAT_TEMPLATE,
    EOI_TOKEN,
    IMAGE_TOKEN,
    JANUS_PRO_SHAPES,
    TINY_IMAGE_SIZE,
    TINY_NUM_IMAGE_TOKENS,
    janus_pro_config,
    save_tiny_janus,
    tiny_janus,
    tiny_janus_config,
    tiny_janus_processor,
)
from .sharding import SHARDING_ENGINES, close_process_group, cpu_sharding_arguments, full_elements, local_elements


__all__ = [
    "SHARDING_ENGINES",
    "close_process_group",
    "cpu_sharding_arguments",
    "full_elements",
    "local_elements",
    "BOI_TOKEN",
    "CHAT_TEMPLATE",
    "COLORS",
    "DIGITS_IMAGE_SIZE",
    "DigitJudge",
    "EOI_TOKEN",
    "IMAGE_TOKEN",
    "JANUS_PRO_SHAPES",
    "PRETRAINED_TINY_JANUS_DIR",
    "PRETRAINED_TINY_JANUS_DIRS",
    "SHAPES",
    "TINY_FAMILY_IMAGE_SIZE",
    "TINY_IMAGE_SIZE",
    "TINY_NUM_IMAGE_TOKENS",
    "digits_corpus",
    "digits_janus_config",
    "digits_janus_processor",
    "digits_vqa_dataset",
    "draw_shape",
    "janus_pro_config",
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
