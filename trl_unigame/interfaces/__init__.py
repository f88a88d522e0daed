from .base import (
    UnsupportedModelError,
    VisualTokenInterface,
    get_interface,
    register_interface,
    supported_families,
    to_pil_images,
    unwrap_model,
)
from .janus import JanusInterface


__all__ = [
    "JanusInterface",
    "UnsupportedModelError",
    "VisualTokenInterface",
    "get_interface",
    "register_interface",
    "supported_families",
    "to_pil_images",
    "unwrap_model",
]
