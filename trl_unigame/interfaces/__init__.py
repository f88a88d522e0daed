from .base import (
    UnsupportedModelError,
    VisualTokenInterface,
    get_interface,
    quantization_skip_modules_for,
    register_interface,
    supported_families,
    to_pil_images,
    unwrap_model,
)
from .emu3 import Emu3Interface
from .idefics3 import Idefics3Interface
from .janus import JanusInterface
from .llava import LlavaInterface
from .paligemma import PaliGemmaInterface
from .qwen2_vl import Qwen2VLInterface
from .vlm import UnderstandingOnlyInterface


__all__ = [
    "Emu3Interface",
    "Idefics3Interface",
    "JanusInterface",
    "LlavaInterface",
    "PaliGemmaInterface",
    "Qwen2VLInterface",
    "UnderstandingOnlyInterface",
    "UnsupportedModelError",
    "VisualTokenInterface",
    "get_interface",
    "quantization_skip_modules_for",
    "register_interface",
    "supported_families",
    "to_pil_images",
    "unwrap_model",
]
