"""Consistency between a generated image and its prompt: the filter that keeps mined candidates on topic."""

from __future__ import annotations

import os

import torch

from .interfaces import to_pil_images


class CLIPConsistencyScorer:
    r"""
    Scores (image, text) pairs with the cosine similarity of CLIP embeddings.

    A callable `(images, texts) -> scores` of shape `(N,)`. Any callable with that signature can replace it in
    [`UniGameTrainer`] (`consistency_scorer=`); `None` there turns the consistency filter off.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-base-patch16"`):
            A Hub id or local folder loadable by `transformers.CLIPModel` and `CLIPProcessor`.
        model (`transformers.CLIPModel`, *optional*):
            An already loaded model (then `processor` is required and `model_name_or_path` ignored).
        processor (`transformers.CLIPProcessor`, *optional*):
            Its processor.
        device (`str` or `torch.device`, *optional*):
            Where to run; defaults to the model's device.
    """

    def __init__(
        self, model_name_or_path: str = "openai/clip-vit-base-patch16", model=None, processor=None, device=None
    ):
        from transformers import CLIPModel, CLIPProcessor

        if model is None:
            # Offline, the Hub is never asked: a model missing from the local cache fails at once instead of after a
            # minute of retries.
            local_only = hub_offline() and not os.path.isdir(model_name_or_path)
            model = CLIPModel.from_pretrained(model_name_or_path, local_files_only=local_only)
            processor = CLIPProcessor.from_pretrained(model_name_or_path, local_files_only=local_only)
        elif processor is None:
            raise ValueError("Pass the CLIP `processor` together with `model`.")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def __call__(self, images, texts: list[str]) -> torch.Tensor:
        images = to_pil_images(images)
        if len(images) != len(texts):
            raise ValueError(f"Got {len(images)} images and {len(texts)} texts; they must match.")
        device = next(self.model.parameters()).device
        inputs = self.processor(text=list(texts), images=images, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image * text).sum(-1).cpu()


def hub_offline() -> bool:
    """Whether the Hub is off: `huggingface_hub`'s offline mode, or `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` set
    after `huggingface_hub` was imported (which reads them only once)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(f and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def load_consistency_scorer(args, scorer=None, can_mine: bool = True):
    """The trainer's consistency scorer: `scorer` when given, else a [`CLIPConsistencyScorer`] loaded from
    `args.consistency_model` (none when that is `None`, neither mining nor the generation check is on, or the model
    cannot generate: `can_mine=False`).

    Called before the model is prepared, so that a scorer that cannot be loaded stops the run before any work.

    Raises:
        OSError: naming the model that could not be loaded and what to pass instead.
    """
    used = args.mining_interval or getattr(args, "generation_check_interval", 0)
    if scorer is not None or args.consistency_model is None or not used or not can_mine:
        return scorer
    try:
        return CLIPConsistencyScorer(args.consistency_model, device=args.device)
    except OSError as error:
        offline = " (the Hub is offline and it is not in the local cache)" if hub_offline() else ""
        raise OSError(
            f"The consistency model {args.consistency_model!r} (`consistency_model`, used to score mined candidates) "
            f"could not be loaded{offline}: {error}. Without a connection to the Hub, pass a local folder holding a CLIP model "
            "and its processor (`consistency_model=/path/to/clip`), pass your own `consistency_scorer`, or turn the "
            "filter off with `consistency_model=None` (on the command line: `--consistency_model none`)."
        ) from error


def suggest_consistency_threshold(
    scorer, dataset, prompt_column: str = "caption", quantile: float = 0.1, n: int = 256
):
    """A `consistency_threshold` calibrated for `scorer` on real data: the `quantile` of its scores on up to `n` real
    (image, prompt) pairs of `dataset`. A mined candidate then passes the filter when it looks at least as on-topic
    as the weakest tenth (by default) of the real pairs.

    Args:
        scorer (`Callable`): `(images, texts) -> scores`, e.g. a [`CLIPConsistencyScorer`].
        dataset (`datasets.Dataset`): rows with `image` and `prompt_column` (the question is used when it is missing).
        prompt_column (`str`, *optional*, defaults to `"caption"`): the generation prompt's column.
        quantile (`float`, *optional*, defaults to `0.1`): which quantile of the real pairs' scores to return.
        n (`int`, *optional*, defaults to `256`): rows scored, spread over the dataset.
    """
    from .data import as_text

    column = prompt_column if prompt_column in dataset.column_names else "question"
    step = max(len(dataset) // n, 1)
    rows = dataset.select(range(0, len(dataset), step)[:n])
    scores = []
    for start in range(0, len(rows), 32):
        chunk = rows.select(range(start, min(start + 32, len(rows))))
        scores.append(torch.as_tensor(scorer(chunk["image"], [as_text(t, column) for t in chunk[column]])).float())
    return float(torch.quantile(torch.cat(scores), quantile))
