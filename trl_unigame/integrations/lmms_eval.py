"""The `unigame` model of lmms-eval: a unified model (Janus, Janus-Pro, Emu3, or any family with a registered
`VisualTokenInterface`), optionally with a UniGame LoRA adapter and a trained perturber, answering lmms-eval's
`generate_until` tasks with the interface's greedy answers (the answers `UniGameEvaluator` scores).

```bash
pip install "trl-unigame[lmms]"
lmms-eval --model unigame \
    --model_args pretrained=deepseek-community/Janus-Pro-1B,adapter=Janus-Pro-1B-UniGame,dtype=bfloat16 \
    --tasks vqav2_val_lite --batch_size 16 --output_path logs/
```

The model is registered through lmms-eval's entry-point group `lmms_eval.models` (see `lmms_eval_manifest`), so
installing this package is enough. `model_args`:

- `pretrained`: Hub id or folder of the base model, or `tiny-digits` for the pretrained tiny digits Janus shipped in
  the package (`trl_unigame.testing.pretrained_tiny_janus`);
- `adapter`: a PEFT (LoRA) adapter folder or Hub id, e.g. the output of a UniGame run;
- `perturber`: a trained perturber folder or Hub id (`perturber/` of a UniGame output), active on every answer;
- `dtype`: `auto` (default), `float32`, `bfloat16` or `float16`;
- `max_new_tokens`: the longest answer when the task's `generation_kwargs` give none (default 16);
- `device` and `batch_size` come from lmms-eval's `--device` and `--batch_size`.

The request -> answer logic (`generation_settings`, `truncate_at`, `group_requests`, `request_image`) is plain
functions, and `UniGameLMM` also works without lmms-eval installed (on any object with lmms-eval's `Instance.args`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence


try:  # lmms-eval is an optional extra: without it the class is a plain object with the same methods.
    from lmms_eval.api.model import lmms as _LMMBase

    LMMS_EVAL_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    _LMMBase = object
    LMMS_EVAL_AVAILABLE = False


logger = logging.getLogger(__name__)

#: The name of the model in lmms-eval (`--model unigame`).
MODEL_ID = "unigame"
#: `pretrained=tiny-digits` loads the pretrained tiny digits Janus shipped in the package.
TINY_DIGITS = "tiny-digits"
#: Default longest answer when a task's `generation_kwargs` have no `max_new_tokens`.
DEFAULT_MAX_NEW_TOKENS = 16
#: Image placeholders that task prompts may hold; the interface places the image itself, so they are removed.
IMAGE_PLACEHOLDERS = ("<image>",)


def lmms_eval_manifest():
    """The payload of the `lmms_eval.models` entry point: lmms-eval's `ModelManifest` of the `unigame` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{__name__}.UniGameLMM",
        aliases=("trl_unigame",),
    )


# ------------------------------------------------------------------------------------------- request handling
def parse_bool(value: Any) -> bool:
    """`model_args` values arrive as strings (`"true"`, `"0"`, ...) or already parsed."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "y", "on"}:
            return True
        if lowered in {"0", "false", "no", "n", "off", "", "none"}:
            return False
        raise ValueError(f"Expected a boolean, got {value!r}.")
    return bool(value)


def optional_str(value: Any) -> str | None:
    """`None` for a missing `model_args` value (`None`, `""`, `"none"`), else the string."""
    if value is None:
        return None
    value = str(value).strip()
    return None if value.lower() in {"", "none", "null"} else value


def parse_batch_size(value: Any, default: int = 1) -> int:
    """lmms-eval's `--batch_size` (a string, default 1). `auto` has no meaning here: a clear error."""
    if value is None:
        return default
    try:
        batch_size = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"batch_size must be a positive integer for the {MODEL_ID} model, got {value!r} ('auto' is not supported)."
        ) from None
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    return batch_size


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> tuple[list[str], int, bool]:
    """`(until, max_new_tokens, sampling_requested)` from a request's `generation_kwargs`.

    `until` is a list of stop strings (a single string is wrapped); `max_new_tokens` falls back to
    `default_max_new_tokens`; `sampling_requested` tells whether the task asked for sampling (`do_sample`, or a
    positive `temperature`), which the greedy answers ignore.
    """
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    elif not isinstance(until, (list, tuple)):
        raise ValueError(f"Expected `until` to be a string or a list of strings, got {type(until).__name__}.")
    until = [u for u in until if isinstance(u, str) and u]
    max_new_tokens = gen_kwargs.get("max_new_tokens")
    max_new_tokens = default_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    temperature = gen_kwargs.get("temperature") or 0
    sampling = parse_bool(gen_kwargs.get("do_sample", False)) or float(temperature) > 0
    return until, max_new_tokens, sampling


def truncate_at(text: str, until: Iterable[str]) -> str:
    """`text` cut before the first occurrence of any stop string, then stripped."""
    cut = len(text)
    for stop in until:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut].strip()


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def group_requests(requests_args: Sequence[tuple], batch_size: int) -> list[list[int]]:
    """Batches of request indices: requests of the same task, split and `generation_kwargs` together, in their
    original order, at most `batch_size` per batch (so a task's rows are answered in the batches
    `UniGameEvaluator` would form with the same batch size)."""
    groups: dict[Any, list[int]] = {}
    for index, args in enumerate(requests_args):
        _, gen_kwargs, _, _, task, split = args[:6]
        groups.setdefault((task, split, _freeze(gen_kwargs or {})), []).append(index)
    batches = []
    for indices in groups.values():
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    return batches


def request_image(visuals: Any, task: str, doc_id: Any):
    """The one RGB image of a request from `doc_to_visual(doc)` (a list or a single image). The interfaces answer
    one image per question: none or several is a clear error."""
    if visuals is None:
        visuals = []
    elif not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = [v for v in visuals if hasattr(v, "convert")]
    if len(images) != 1 or len(visuals) != 1:
        kinds = ", ".join(type(v).__name__ for v in visuals) or "nothing"
        raise ValueError(
            f"The {MODEL_ID} model answers questions about exactly one image, but document {doc_id} of task "
            f"{task!r} gave {len(visuals)} visual(s) ({kinds}). Text-only, multi-image and video tasks are not "
            "supported."
        )
    return images[0].convert("RGB")


def clean_context(context: str, extra_placeholders: Iterable[str] = ()) -> str:
    """The question of a request: its context without image placeholders (the interface's chat prompt places the
    image), stripped."""
    for placeholder in (*IMAGE_PLACEHOLDERS, *extra_placeholders):
        if placeholder:
            context = context.replace(placeholder, "")
    return context.strip()


# ------------------------------------------------------------------------------------------------ loading
def load_unigame_model(
    pretrained: str,
    adapter: str | None = None,
    perturber: str | None = None,
    dtype: str = "auto",
    device: Any = None,
):
    """`(model, processor, perturber)`: the base model (`tiny-digits` or a Hub id / folder loaded with
    `AutoModelForImageTextToText`), with the LoRA `adapter` applied when given, on `device`, in eval mode; the
    perturber (loaded with `Perturber.from_pretrained`, not yet attached) or `None`.

    Raises:
        ValueError: for an unknown `dtype`, or a perturber that reads the answer loss's gradient (lmms-eval gives the
            model no reference answer to differentiate).
    """
    import torch

    if dtype in (None, "", "auto"):
        torch_dtype = "auto"
    else:
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    if pretrained == TINY_DIGITS:
        from ..testing import pretrained_tiny_janus

        model, processor = pretrained_tiny_janus(**({} if torch_dtype == "auto" else {"dtype": torch_dtype}))
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(pretrained)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if device is not None:
        model = model.to(device)
    model.eval()
    loaded_perturber = None
    if perturber is not None:
        from ..perturber import Perturber

        loaded_perturber = Perturber.from_pretrained(perturber)
        if loaded_perturber.sees_gradient:
            raise ValueError(
                f"This perturber reads the gradient of the answer loss (`inputs='{loaded_perturber.config.inputs}'`), "
                "which needs each question's reference answer; lmms-eval gives the model none. Evaluate it with "
                "`trl_unigame.UniGameEvaluator(perturber=...)` instead."
            )
    return model, processor, loaded_perturber


# -------------------------------------------------------------------------------------------------- model
class UniGameLMM(_LMMBase):
    """lmms-eval's `unigame` model: greedy answers of a unified model (plus a LoRA adapter and a perturber) to
    `generate_until` requests, through `get_interface(model, processor).answer`.

    Args:
        pretrained (`str`): Hub id or folder of the base model, or `"tiny-digits"`.
        adapter (`str`, *optional*): PEFT LoRA adapter folder or Hub id.
        perturber (`str`, *optional*): Trained perturber folder or Hub id, active on every answer.
        dtype (`str`, *optional*, defaults to `"auto"`): `auto`, `float32`, `bfloat16` or `float16`.
        device (`str`, *optional*): Defaults to the process's accelerate device (a GPU when there is one).
        batch_size (`int` or `str`, *optional*, defaults to 1): Requests answered together.
        max_new_tokens (`int`, *optional*, defaults to 16): Longest answer when a task gives none.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = TINY_DIGITS,
        adapter: str | None = None,
        perturber: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: Any = None,
        **kwargs,
    ) -> None:
        if LMMS_EVAL_AVAILABLE:
            super().__init__()
        else:
            self._rank, self._world_size, self.task_dict = 0, 1, {}
            self.cache_hook = None
        if kwargs:
            logger.warning("The %s model ignores the unknown model_args %s.", MODEL_ID, sorted(kwargs))
        from accelerate import PartialState

        from ..interfaces import get_interface

        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        device = optional_str(device)
        self._device = state.device if device is None else device
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.model, self.processor, self.perturber = load_unigame_model(
            str(pretrained),
            optional_str(adapter),
            optional_str(perturber),
            optional_str(dtype) or "auto",
            self._device,
        )
        self.interface = get_interface(self.model, self.processor)
        if self.perturber is not None:
            # Float32, as UniGameEvaluator and training run it; `attach` checks the hidden size.
            import torch

            self.perturber.to(device=self.interface.device, dtype=torch.float32).attach(self.model)
        tokenizer = getattr(self.processor, "tokenizer", None)
        self._placeholders = tuple(
            t for t in (getattr(self.processor, "image_token", None), getattr(tokenizer, "image_token", None)) if t
        )
        self._warned_sampling = False

    # lmms-eval reads these
    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def answer(self, images: list, questions: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers of the model (the perturber active when there is one) to `questions` about `images`."""
        import contextlib

        active = self.perturber.active() if self.perturber is not None else contextlib.nullcontext()
        with active:
            return self.interface.answer(self.model, images, questions, max_new_tokens=max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        """Answers of `requests` (lmms-eval `Instance`s whose `args` are `(context, generation_kwargs, doc_to_visual,
        doc_id, task, split)`), in their order: the question is the context, the image `doc_to_visual(doc)`, the
        answer greedy, at most `max_new_tokens` tokens and cut at the first `until` string."""
        args = [request.args for request in requests]
        results: list[str | None] = [None] * len(args)
        for batch in group_requests(args, self.batch_size):
            context0, gen_kwargs, doc_to_visual, _, task, split = args[batch[0]][:6]
            until, max_new_tokens, sampling = generation_settings(gen_kwargs, self.max_new_tokens)
            if sampling and not self._warned_sampling:
                logger.warning("Task %r asks for sampling; the %s model answers greedily.", task, MODEL_ID)
                self._warned_sampling = True
            docs = self.task_dict[task][split]
            images = [request_image(doc_to_visual(docs[args[i][3]]), task, args[i][3]) for i in batch]
            questions = [clean_context(args[i][0], self._placeholders) for i in batch]
            answers = self.answer(images, questions, max_new_tokens)
            for i, answer in zip(batch, answers):
                results[i] = truncate_at(answer, until)
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), results[i])
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"The {MODEL_ID} model answers `generate_until` tasks only (greedy answers, as UniGameEvaluator scores "
            "them); it does not score continuations. Use a task with `output_type: generate_until`."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(
            f"The {MODEL_ID} model answers single-round `generate_until` tasks only; multi-round tasks are not "
            "supported."
        )


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "LMMS_EVAL_AVAILABLE",
    "MODEL_ID",
    "TINY_DIGITS",
    "UniGameLMM",
    "clean_context",
    "generation_settings",
    "group_requests",
    "lmms_eval_manifest",
    "load_unigame_model",
    "parse_batch_size",
    "request_image",
    "truncate_at",
]
