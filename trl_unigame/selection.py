"""Which mined candidates count as hard: the paper's rule and the authors' reference rule."""

from __future__ import annotations

import torch


SELECTION_RULES = ("paper", "reference")


def hardness(ce: torch.Tensor, consistency: torch.Tensor | None, weight: float, threshold: float) -> torch.Tensor:
    """`H = CE + weight * max(0, threshold - s)`; `H = CE` when there is no consistency score."""
    if consistency is None:
        return ce
    return ce + weight * (threshold - consistency).clamp(min=0)


def select_hard_candidates(
    hardness: torch.Tensor,
    consistency: torch.Tensor | None,
    source: torch.Tensor,
    rule: str = "paper",
    quantile: float = 0.6,
    threshold: float = 0.30,
    top_k: int = 1,
) -> torch.Tensor:
    r"""
    Returns the indices of the candidates to keep, hardest first within each source sample.

    Args:
        hardness (`torch.Tensor`): `H` of each candidate, shape `(N,)`.
        consistency (`torch.Tensor` or `None`): consistency score `s` of each candidate; `None` disables the filter.
        source (`torch.Tensor`): index of the source sample each candidate was generated for, shape `(N,)`.
        rule (`str`, *optional*, defaults to `"paper"`):
            - `"paper"`: keep candidates with `s >= threshold` **and** `H >=` the `quantile`-quantile of `H`.
            - `"reference"`: the authors' code, keep `H >=` quantile **or** `s <= threshold` (this keeps
              low-consistency candidates, which the paper says it filters out).
        quantile (`float`, *optional*, defaults to `0.6`): hardness quantile over the mining batch.
        threshold (`float`, *optional*, defaults to `0.30`): consistency threshold `tau`.
        top_k (`int`, *optional*, defaults to `1`): candidates kept per source sample at most.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"`rule` must be one of {SELECTION_RULES}, got {rule!r}.")
    if hardness.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    hardness = hardness.detach().float().cpu()
    source = source.detach().cpu()
    finite = torch.isfinite(hardness)
    if not finite.any():
        return torch.zeros(0, dtype=torch.long)
    cut = torch.quantile(hardness[finite], quantile)
    hard = finite & (hardness >= cut)
    if consistency is None:
        keep = hard
    else:
        consistency = consistency.detach().float().cpu()
        if rule == "paper":
            keep = hard & (consistency >= threshold)
        else:
            keep = finite & (hard | (consistency <= threshold))
    kept = []
    for s in source[keep].unique().tolist():
        index = torch.nonzero(keep & (source == s)).squeeze(-1)
        order = torch.argsort(hardness[index], descending=True, stable=True)
        kept.append(index[order[:top_k]])
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    kept = torch.cat(kept)
    return kept[torch.argsort(hardness[kept], descending=True, stable=True)]
