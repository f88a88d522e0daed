"""The shared visual-token interface: everything model-specific that the game needs, behind one object per family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn


class UnsupportedModelError(ValueError):
    """Raised when a model has no known shared visual-token interface."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strips distributed wrappers (`.module`), `torch.compile` and PEFT wrappers down to the transformers model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A CPU uint8 copy of image pixels given as `[0, 1]` floats (or already uint8)."""
    if image.dtype == torch.uint8:
        return image.detach().cpu()
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def to_pil_images(images: Any) -> list[Image.Image]:
    """Converts PIL images, `[0, 1]` float tensors `(B, C, H, W)` or uint8 tensors to a list of RGB PIL images."""
    if isinstance(images, torch.Tensor):
        arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            out.extend(to_pil_images(image.unsqueeze(0)))
        else:
            out.append(image.convert("RGB"))
    return out


class VisualTokenInterface(ABC):
    """The two sites where the understanding and generation paths of a unified model meet the LLM, and the few
    operations the game needs on them.

    Subclass it for a new model family, implement the abstract members and register the subclass with
    [`register_interface`]. The trainer and the perturber never touch model modules except through this object.

    Args:
        model (`torch.nn.Module`):
            The model, plain or wrapped (PEFT, DDP, `torch.compile`).
        processor (`transformers.ProcessorMixin`, *optional*):
            The model's processor; needed to build inputs and to generate.
    """

    #: Name of the model family, shown in error messages.
    family: str = ""

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.base_model = unwrap_model(model)
        self.processor = processor

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating-point dtype of the model's parameters (the dtype pixel values are cast to)."""
        return next(p for p in self.base_model.parameters() if p.is_floating_point()).dtype

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this interface knows the (unwrapped) `model`."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the shared visual-token space (the LLM's hidden size)."""

    @property
    @abstractmethod
    def understanding_site(self) -> nn.Module:
        """Module whose output is the visual tokens the LLM receives on the understanding path."""

    @property
    @abstractmethod
    def generation_site(self) -> nn.Module:
        """Module whose output is the embedding of each sampled image token fed back during generation."""

    @property
    @abstractmethod
    def lora_target_modules(self) -> str:
        """Regex of the LLM's linear layers that LoRA should adapt (and nothing in the vision or generation stack)."""

    @property
    def quantization_skip_modules(self) -> list[str]:
        """Full module names to keep out of 4-bit quantization."""
        return []

    @abstractmethod
    def build_understanding_inputs(self, images, questions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """Tokenizes (image, question, answer) triples into model inputs whose `labels` mask everything but the answer."""

    @abstractmethod
    def understanding_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Returns one cross-entropy per sample (mean over that sample's answer tokens), shape `(batch,)`."""

    @abstractmethod
    def generate_images(
        self,
        prompts: list[str],
        num_images: int = 1,
        guidance_scale: float = 5.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generates `num_images` images per prompt; returns pixels in `[0, 1]`, `(len(prompts) * num_images, 3, H, W)`,
        at the size the understanding side expects, grouped by prompt."""

    def generation_loss(self, model: nn.Module, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """One cross-entropy per sample of generating `images` (`[0, 1]`, `(B, 3, H, W)`) from `prompts`: the model's
        own image-generation loss, used to keep the shared generator good while the understanding player trains."""
        raise NotImplementedError(f"{type(self).__name__} has no image-generation loss.")

    def source_images(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's input images as pixels in `[0, 1]` (for display), or `None` when they cannot be recovered."""
        return None

    def answer(self, model: nn.Module, images, questions: list[str], max_new_tokens: int = 16) -> list[str]:
        """Greedy answers of `model` to `questions` about `images`, batched (for display and evaluation). Forward hooks
        on `understanding_site` (a perturber, an attack) act on the answers."""
        raise NotImplementedError


_REGISTRY: list[type[VisualTokenInterface]] = []


def register_interface(interface_cls: type[VisualTokenInterface]) -> type[VisualTokenInterface]:
    """Registers an interface class (usable as a decorator); later registrations are tried first."""
    if interface_cls not in _REGISTRY:
        _REGISTRY.insert(0, interface_cls)
    return interface_cls


def supported_families() -> list[str]:
    return [cls.family for cls in _REGISTRY]


def get_interface(model: nn.Module, processor=None) -> VisualTokenInterface:
    """Returns the shared visual-token interface of `model`.

    Raises:
        UnsupportedModelError: when no registered interface knows the model.
    """
    base = unwrap_model(model)
    for cls in _REGISTRY:
        if cls.supports(base):
            return cls(model, processor)
    raise UnsupportedModelError(
        f"{type(base).__name__} has no known shared visual-token interface. Supported model families: "
        f"{', '.join(supported_families())}. To add one, subclass `trl_unigame.VisualTokenInterface` (see "
        "`trl_unigame/interfaces/janus.py`) and register it with `trl_unigame.register_interface`."
    )
