"""The shared visual-token interface: everything model-specific that the game needs, behind one object per family."""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .generation import ImageTokenLoop


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


class VisualTokenInterface(ImageTokenLoop, ABC):
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
    #: Parameter-name prefixes of the LLM (and its head) that train when no LoRA is used.
    understanding_parameter_prefixes: tuple[str, ...] = ("model.language_model.", "lm_head.")

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.base_model = unwrap_model(model)
        self.processor = processor
        self._compiled_steps: dict[Any, Callable] = {}
        # Static KV caches kept between compiled generation calls, one per batch: (cache length, cache).
        self._generation_caches: dict[Any, tuple[int, Any]] = {}

    def _require_processor(self):
        """The processor, or a clear error for the operations that need it (building inputs, generating)."""
        if self.processor is None:
            raise ValueError("This operation needs the model's processor: pass `processor=` to `get_interface`.")
        return self.processor

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
    def generation_site(self) -> nn.Module | None:
        """Module whose output is the embedding of each sampled image token fed back during generation, or `None` for
        a model that cannot generate images (an understanding-only VLM)."""

    @property
    def can_generate(self) -> bool:
        """Whether the model generates images (and so whether decoded hard samples can be mined)."""
        return self.generation_site is not None

    def site_mask(self, site: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None] | None:
        """Which positions of a site's output are visual tokens, when not all of them are.

        Returns `None` (the default) when every position of the site's output is a visual token. Otherwise returns a
        callable `(module, args, output) -> mask` that the perturber's forward hook calls: `mask` is a boolean tensor
        of shape `output.shape[:-1]` (only its `True` positions are perturbed), or `None` to perturb every position.
        It runs at every generated token, so it should read nothing back to the host.
        Emu3 uses it: its site is the LLM's `embed_tokens`, which embeds text and visual tokens alike.

        Args:
            site (`str`): `"understanding"` or `"generation"`.
        """
        return None

    @property
    def frozen_eval_modules(self) -> list[nn.Module]:
        """Frozen modules that stay in eval mode while the model trains: a VQ model in train mode would normalise each
        image by its batch's statistics (Emu3's batch norms) and move its running statistics."""
        return []

    def is_understanding_parameter(self, name: str) -> bool:
        """Whether the parameter `name` belongs to the understanding player when the whole LLM trains (no LoRA)."""
        return name.startswith(self.understanding_parameter_prefixes)

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

    def generate_images(
        self,
        prompts: list[str],
        num_images: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        image_size: int | None = None,
        compile_config=None,
        return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Generates `num_images` images per prompt; returns pixels in `[0, 1]`, `(len(prompts) * num_images, 3, H, W)`,
        at the size the understanding side expects, grouped by prompt. `image_size` (pixels per side) generates on a
        smaller token grid than the model's own (see [`~VisualTokenInterface.generation_grid`]), then resizes.
        `compile_config` (a `transformers.CompileConfig`) compiles the one-token step of the loop with
        `torch.compile`; the first call pays the compilation, and later calls with the same batch and 64-token cache
        bucket reuse its graph and its KV cache (a new batch size or bucket compiles one more graph). With
        `return_tokens=True`, returns `(pixels, tokens)`: the sampled image tokens too, `(len(prompts) * num_images,
        num_tokens)`, as [`~VisualTokenInterface.image_token_log_probs`] takes them.

        `guidance_scale` (classifier-free guidance) and `temperature` (`0` is greedy) left `None` take the model's
        own, from its `generation_config` (`guidance_scale`, `temperature`), else 5.0 and 1.0 (see
        [`~VisualTokenInterface.generation_settings`]).

        Raises:
            NotImplementedError: for a model that cannot generate images (`can_generate` is `False`).
        """
        raise NotImplementedError(f"{type(self.base_model).__name__} cannot generate images.")

    def image_token_log_probs(
        self,
        prompts: list[str],
        tokens: torch.Tensor,
        num_images: int = 1,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        image_size: int | None = None,
    ) -> torch.Tensor:
        """The log-probability of each sampled image token under the distribution
        [`~VisualTokenInterface.generate_images`] samples it from, in one teacher-forced pass: the prompts and the
        tokens fed back through the generation site (a perturber active there acts as it did while sampling), with
        the same classifier-free guidance and temperature (`log_softmax((uncond + s * (cond - uncond)) / T)` at each
        token). Differentiable: it runs under the caller's grad mode, with the model in whatever mode it is in (use
        `eval()`, as sampling does, so that dropout does not change the distribution).

        Args:
            prompts (`list[str]`): The prompts the tokens were generated from.
            tokens (`torch.Tensor`): `(len(prompts) * num_images, num_tokens)`, from `generate_images(...,
                return_tokens=True)`, grouped by prompt.
            num_images (`int`, *optional*, defaults to `1`): Images per prompt.
            guidance_scale (`float`, *optional*): The guidance scale of the sampling; `None` takes the model's (see
                [`~VisualTokenInterface.generation_settings`]).
            temperature (`float`, *optional*): The sampling temperature, positive; `None` takes the model's.
            image_size (`int`, *optional*): The `image_size` of the sampling.

        Returns:
            `torch.Tensor`: float32, `(len(prompts) * num_images, num_tokens)`; 0 at tokens the grammar forces (Emu3's
            end of line). Their sum over a row is the log-probability of that image's tokens.

        Raises:
            NotImplementedError: for a model that cannot generate images.
        """
        raise NotImplementedError(f"{type(self.base_model).__name__} cannot generate images.")

    def generation_grid(self, image_size: int | None = None) -> int:
        """Side of the image-token grid the generator uses for images of `image_size` pixels (its own when `None`).

        Raises:
            ValueError: when the family cannot generate at `image_size`.
        """
        if image_size is None:
            raise NotImplementedError(f"{type(self.base_model).__name__} cannot generate images.")
        raise ValueError(
            f"`mining_image_size` is not supported for {type(self.base_model).__name__} ({self.family}): leave it "
            "`None` to mine at the model's own generation size."
        )

    def generation_loss(self, model: nn.Module, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """One cross-entropy per sample of generating `images` (`[0, 1]`, `(B, 3, H, W)`) from `prompts`: the model's
        own image-generation loss, used to keep the shared generator good while the understanding player trains."""
        raise NotImplementedError(f"{type(self).__name__} has no image-generation loss.")

    def concatenate_inputs(
        self, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """One batch of the rows of two batches from [`~VisualTokenInterface.build_understanding_inputs`], `first`'s
        rows first, left-padded to the longer one; `None` when they cannot share a forward (different keys, or image
        tensors of different shapes), in which case they run as two passes.

        Extra left padding leaves each row's loss as it was, up to rounding: the padding is masked, and rotary
        position embeddings depend only on the distance between tokens.
        """
        tokenizer = getattr(self.processor, "tokenizer", None)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        return concatenate_left_padded(first, second, pad_id=0 if pad_id is None else pad_id)

    def source_images(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The batch's input images as pixels in `[0, 1]` (for display), or `None` when they cannot be recovered."""
        return None

    def _greedy_answers(self, model: nn.Module, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        """Greedy continuations of left-padded prompts, decoded. The length is given as `max_length` (prompt plus
        `max_new_tokens`): a model whose generation config sets its own `max_length` warns at every call that is given
        `max_new_tokens`."""
        from ..game.sharding import parameters_gathered

        tokenizer = self._require_processor().tokenizer
        prompt = inputs["input_ids"].shape[1]
        # With FSDP2's parameters gathered whole, each process generates alone: no per-token wait for the others.
        synced = {"synced_gpus": False} if parameters_gathered() else {}
        out = self._text_generate(model)(
            **inputs,
            max_length=prompt + max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **synced,
        )
        return [t.strip() for t in tokenizer.batch_decode(out[:, prompt:], skip_special_tokens=True)]

    def _text_generate(self, model: nn.Module) -> Callable:
        """The `generate` that [`~VisualTokenInterface.answer`] calls for text: `model.generate` unless the family
        needs another way in."""
        return model.generate

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
    """Names of the registered model families, most recently registered first."""
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
        f"{'; '.join(supported_families())}. To add one, subclass `trl_unigame.VisualTokenInterface` (see "
        "`trl_unigame/interfaces/janus.py` and docs/models.md) and register it with `trl_unigame.register_interface`."
    )


def keep_in_eval(module: nn.Module) -> nn.Module:
    """Pins `module` in eval mode: a later `model.train()` no longer reaches it. Returns `module`."""

    def train(self, mode: bool = True):
        return nn.Module.train(self, False)

    module.train = types.MethodType(train, module)
    return module.eval()


def quantization_skip_modules_for(pretrained_model_name_or_path: str, **config_kwargs) -> list[str]:
    """The modules to keep out of 4-bit quantization for a checkpoint, known before its weights are loaded (a
    `BitsAndBytesConfig` needs them up front): the family is read from an empty model built on the meta device.

    Args:
        pretrained_model_name_or_path (`str`): Hub id or folder of an image-text-to-text checkpoint.
        **config_kwargs: Passed to `AutoConfig.from_pretrained` (e.g. `revision`).

    Raises:
        UnsupportedModelError: when no registered interface knows the model.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    return get_interface(skeleton).quantization_skip_modules


# ----------------------------------------------------------------------------------------------- shared helpers
def append_answers(
    encoded: dict[str, Any],
    answers: list[str],
    tokenizer,
    per_token_keys: tuple[str, ...] = (),
    answer_token_type: int = 0,
) -> dict[str, torch.Tensor]:
    """Appends each answer (and EOS) to processor-encoded prompts and left-pads the result again, so that every
    answer ends the sequence; `labels` are -100 except on the answer and EOS.

    Args:
        encoded (`dict`):
            Processor output with `return_tensors="pt"`, padded on either side, with `input_ids` and `attention_mask`.
            Keys that are not per-token (pixel values, grid sizes) are passed through unchanged.
        answers (`list[str]`): One answer per row.
        tokenizer: The processor's tokenizer.
        per_token_keys (`tuple[str]`):
            Other per-token tensors of `encoded` (e.g. `token_type_ids`) to extend with `answer_token_type` over the
            answer and pad with 0.
        answer_token_type (`int`): Value of the `per_token_keys` tensors on the answer.
    """
    keys = [k for k in per_token_keys if k in encoded]
    eos = tokenizer.eos_token_id
    rows = []
    for i, answer in enumerate(answers):
        keep = encoded["attention_mask"][i].bool()
        prompt = encoded["input_ids"][i][keep]
        answer_ids = torch.tensor(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [eos])
        row = {
            "input_ids": torch.cat([prompt, answer_ids]),
            "labels": torch.cat([torch.full_like(prompt, -100), answer_ids]),
        }
        for k in keys:
            row[k] = torch.cat([encoded[k][i][keep], torch.full_like(answer_ids, answer_token_type)])
        rows.append(row)
    length = max(len(r["input_ids"]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    fills = {"input_ids": pad_id, "labels": -100, "attention_mask": 0, **dict.fromkeys(keys, 0)}
    out = {k: torch.full((len(rows), length), fill, dtype=torch.long) for k, fill in fills.items()}
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for k in ("input_ids", "labels", *keys):
            out[k][i, length - n :] = row[k]
        out["attention_mask"][i, length - n :] = 1
    for k, v in encoded.items():
        if k not in out:
            out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return out


def concatenate_left_padded(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], pad_id: int = 0
) -> dict[str, torch.Tensor] | None:
    """Concatenates two left-padded batches row-wise: per-token tensors (shaped like `input_ids`) are left-padded to
    the longer sequence (`input_ids` with `pad_id`, `labels` with -100, the rest with 0), other tensors are
    concatenated along their first dimension. Returns `None` when the batches have different keys or a tensor whose
    trailing shapes differ."""
    if set(first) != set(second) or "input_ids" not in first:
        return None
    shapes = (first["input_ids"].shape, second["input_ids"].shape)
    length = max(shapes[0][1], shapes[1][1])
    fills = {"input_ids": pad_id, "labels": -100}
    out = {}
    for key in first:
        parts = [first[key], second[key]]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            return None
        if all(p.dim() >= 2 and p.shape[:2] == shape for p, shape in zip(parts, shapes)):
            parts = [
                nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (length - p.shape[1], 0), value=fills.get(key, 0))
                for p in parts
            ]
        if parts[0].shape[1:] != parts[1].shape[1:]:
            return None
        out[key] = torch.cat([parts[0], parts[1].to(parts[0].device)])
    return out


def per_sample_answer_loss(model: nn.Module, inputs: dict[str, torch.Tensor], **model_inputs) -> torch.Tensor:
    """One cross-entropy per sample, the mean over its labelled (answer) tokens, shape `(batch,)`.

    Inputs are left-padded (see [`append_answers`]), so every answer sits at the end and only the last positions need
    logits. `model_inputs` are the model's inputs (everything but the labels).
    """
    labels = inputs["labels"]
    answer_span = int((labels != -100).int().argmax(-1).min().item()) if labels.numel() else 0
    keep = labels.shape[1] - answer_span + 1
    outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits[:, -keep:-1].float()
    targets = labels[:, -(keep - 1) :]
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(-1).clamp(min=1)
    return token_loss.sum(-1) / counts
