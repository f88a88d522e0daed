"""White-box attacks at the shared visual-token interface: PGD on a per-token L2 ball around the visual tokens."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


ATTACK_BUDGETS = ("absolute", "relative")


def _shaped_like(delta: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if delta.shape == output.shape:
        return delta
    if delta.numel() == output.numel():  # e.g. a site that returns tokens flattened over the batch
        return delta.reshape(output.shape)
    raise ValueError(
        f"The perturbation has shape {tuple(delta.shape)} but the visual tokens at the understanding site have shape "
        f"{tuple(output.shape)}: the batch answered differs from the batch attacked."
    )


def _check_tokens(module: nn.Module, output) -> None:
    if not torch.is_tensor(output):
        raise TypeError(
            f"The understanding site {type(module).__name__} returns {type(output).__name__}, not a tensor of visual "
            "tokens: this interface cannot be attacked there."
        )


def _add(output: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`output + delta` in float32, cast back; with a `mask`, only at the masked positions (`delta` holds those)."""
    if mask is None:
        d = _shaped_like(delta, output)
        return (output.float() + d.to(output.device, torch.float32)).to(output.dtype)
    count = int(mask.sum())
    if count == 0 or (count != len(delta) and output.dim() >= 2 and output.shape[-2] == 1):
        return output  # a call with no visual token, or a decoding step that samples one: not the attacked image

    perturbed = output.clone()
    tokens = output[mask]
    perturbed[mask] = (tokens.float() + _shaped_like(delta, tokens).to(output.device, torch.float32)).to(output.dtype)
    return perturbed


@contextlib.contextmanager
def perturbation_at(site: nn.Module, delta: torch.Tensor, mask_fn=None):
    r"""
    Context manager that adds `delta` to the output of `site` (a forward hook), in float32, cast back to the output's
    dtype, as the perturber does.

    Args:
        site (`torch.nn.Module`):
            The module whose output is the visual tokens, e.g. `interface.understanding_site`.
        delta (`torch.Tensor`):
            Same shape as the site's output (or as many elements); with `mask_fn`, one row per visual token.
        mask_fn (`Callable`, *optional*):
            `interface.site_mask("understanding")`: for a site whose output mixes visual and text tokens (Emu3's
            embeddings), which positions are visual; only those are perturbed.
    """

    def hook(module, args, output):
        _check_tokens(module, output)
        mask = mask_fn(module, args, output) if mask_fn is not None else None
        return _add(output, delta, mask)

    handle = site.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def project_to_ball(delta: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Projects each token of `delta` (last dimension) onto the L2 ball of `radius` (a float or a per-token tensor)."""
    norm = delta.norm(dim=-1, keepdim=True)
    scale = torch.clamp(torch.as_tensor(radius, dtype=delta.dtype, device=delta.device) / norm.clamp_min(1e-12), max=1)
    return delta * scale


def pgd_attack(
    interface,
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    eps: float,
    steps: int = 5,
    step_size: float | None = None,
    budget: str = "absolute",
) -> torch.Tensor:
    r"""
    Projected gradient ascent on the understanding loss, with a perturbation added to the visual tokens at
    `interface.understanding_site`, constrained per token to an L2 ball.

    Each step moves every token's perturbation by `step_size` (times the budget) along its normalised loss gradient,
    then projects it back onto its ball. The loss is the sum over samples of `interface.understanding_loss` (each
    sample's mean cross-entropy of its answer), so every sample is attacked on its own answer.

    Args:
        interface ([`VisualTokenInterface`]):
            The model's interface.
        model (`torch.nn.Module`):
            The model attacked (plain or PEFT); its weights get no gradient.
        inputs (`dict[str, torch.Tensor]`):
            Understanding inputs with labels (`interface.build_understanding_inputs`), on the model's device.
        eps (`float`):
            Budget: the largest L2 norm of each token's perturbation (`"absolute"`), or its largest ratio to the
            token's own norm (`"relative"`: radius `eps * ||z||` per token).
        steps (`int`, *optional*, defaults to `5`):
            Number of gradient steps.
        step_size (`float`, *optional*):
            Length of each step as a fraction of the radius; defaults to `2.5 / steps` (Madry et al.).
        budget (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"` or `"relative"`.

    Returns:
        `torch.Tensor`: The perturbation, float32, shaped like the site's output; every token within its radius.
    """
    if budget not in ATTACK_BUDGETS:
        raise ValueError(f"`budget` must be one of {list(ATTACK_BUDGETS)}, got {budget!r}.")
    if eps <= 0:
        raise ValueError(f"The attack budget `eps` must be > 0, got {eps}.")
    if steps < 1:
        raise ValueError(f"The attack needs at least one step, got steps={steps}.")
    step_fraction = 2.5 / steps if step_size is None else step_size
    state: dict[str, torch.Tensor] = {}
    mask_fn = interface.site_mask("understanding")

    def hook(module, args, output):
        _check_tokens(module, output)
        mask = mask_fn(module, args, output) if mask_fn is not None else None
        if mask is not None and not mask.any():  # a call that embeds no visual token (e.g. Emu3's text prompt)
            return output
        if "delta" not in state:  # first pass: the perturbation starts at zero, the radius from the clean tokens
            tokens = (output if mask is None else output[mask]).detach().float()
            state["radius"] = eps * tokens.norm(dim=-1, keepdim=True) if budget == "relative" else torch.tensor(eps)
            state["delta"] = torch.zeros_like(tokens, requires_grad=True)
        return _add(output, state["delta"], mask)

    handle = interface.understanding_site.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = interface.understanding_loss(model, inputs).sum()
                delta, radius = state["delta"], state["radius"].to(state["delta"].device)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    step = step_fraction * radius * F.normalize(grad.float(), dim=-1, eps=1e-12)
                    state["delta"] = project_to_ball(delta + step, radius).requires_grad_(True)
    finally:
        handle.remove()
    return state["delta"].detach()
