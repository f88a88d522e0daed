"""Image-image similarity for the reverse consistency (real image -> own caption -> own drawing -> similarity)."""

from __future__ import annotations

from typing import Callable

import torch

from ..interfaces import to_pil_images


class JudgeAgreement:
    r"""
    Image-image similarity from a task judge: 1 when the judge reads the same digit and the same ink colour in both
    images, else 0. Wraps a [`DigitJudge`] (any object with `predict(images) -> (labels, colors)`).

    Called as `similarity(generated, real)`, images as `[0, 1]` float tensors `(B, 3, H, W)`, uint8 tensors or PIL.
    """

    def __init__(self, judge):
        if not callable(getattr(judge, "predict", None)):
            raise TypeError(f"{type(judge).__name__} has no `predict(images) -> (labels, colors)`.")
        self.judge = judge

    def __call__(self, generated, real) -> torch.Tensor:
        generated_labels = self.judge.predict(generated)
        real_labels = self.judge.predict(real)
        same = [all(a == b for a, b in zip(g, r)) for g, r in zip(zip(*generated_labels), zip(*real_labels))]
        return torch.tensor(same, dtype=torch.float32)


class CLIPImageSimilarity:
    r"""
    Image-image similarity: the cosine of the CLIP image embeddings of the two images. Wraps a
    [`CLIPConsistencyScorer`] (its model and processor).

    Called as `similarity(generated, real)`, images as `[0, 1]` float tensors `(B, 3, H, W)`, uint8 tensors or PIL.
    """

    def __init__(self, scorer):
        self.model = scorer.model
        self.processor = scorer.processor

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """Unit-length CLIP image embeddings, `(B, D)`."""
        device = next(self.model.parameters()).device
        pixels = self.processor(images=to_pil_images(images), return_tensors="pt")["pixel_values"].to(device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    def __call__(self, generated, real) -> torch.Tensor:
        return (self.embed(generated) * self.embed(real)).sum(-1)


def as_image_similarity(similarity) -> Callable | None:
    """`(generated, real) -> scores`: a [`DigitJudge`] becomes a [`JudgeAgreement`], a [`CLIPConsistencyScorer`] a
    [`CLIPImageSimilarity`]; any other callable is used as it is, `None` stays `None`."""
    from ..consistency import CLIPConsistencyScorer
    from ..digit_judge import DigitJudge

    if similarity is None or isinstance(similarity, (JudgeAgreement, CLIPImageSimilarity)):
        return similarity
    if isinstance(similarity, DigitJudge):
        return JudgeAgreement(similarity)
    if isinstance(similarity, CLIPConsistencyScorer):
        return CLIPImageSimilarity(similarity)
    if not callable(similarity):
        raise TypeError(
            "`image_similarity` must be a `(generated, real) -> scores` callable, a DigitJudge or a "
            f"CLIPConsistencyScorer, got {type(similarity).__name__}."
        )
    return similarity
