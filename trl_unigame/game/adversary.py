"""The adversary's step: the perturber ascends U's loss, exactly (its own pass) or to first order (from the gradient
the clean backward leaves at the visual tokens)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from .agreement import Agreement, all_finite
from .metrics import GameMetrics
from .precision import unscaled


# Below this cosine between the perturbation that reached the model and the intended one, the trainer warns.
REALIZED_COSINE_WARNING = 0.9


def generation_budget(args) -> dict | None:
    """The perturber's `site_budgets` for the config's generation-site fields (`None` when they add nothing)."""
    override = {}
    if args.perturber_generation_budget is not None:
        override["budget"] = args.perturber_generation_budget
    if args.perturber_generation_eps_max is not None:
        override["eps_max"] = args.perturber_generation_eps_max
    if args.perturber_generation_row_scales is not None:
        override["row_scales"] = list(args.perturber_generation_row_scales)
    return {"generation": override} if override else None


def build_perturber(model, args):
    """A fresh [`Perturber`] sized for `model`, with the config's width, depth, budgets and sites."""
    from ..perturber import Perturber

    return Perturber.for_model(
        model,
        width=args.perturber_width,
        depth=args.perturber_depth,
        eps_max=args.perturber_eps_max,
        eps_init=args.perturber_eps_init,
        sites=args.perturber_sites,
        budget=args.perturber_budget,
        site_budgets=generation_budget(args),
        inputs=args.perturber_inputs,
    )


def perturber_optimizer(perturber, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the perturber's parameters that decays its weight matrices only: its scalars (the eps logit, the
    gradient gain) and biases are not pulled to 0, which would move eps to mid-range whatever the game does.

    Args:
        perturber ([`Perturber`]): The perturber.
        lr (`float`): The learning rate.
        weight_decay (`float`): The decay of its weight matrices.

    Returns:
        `torch.optim.AdamW`: Two parameter groups, the matrices (`weight_decay`) then the rest (no decay).
    """
    params = list(perturber.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
    )


@dataclass
class CapturedTokens:
    """One call of the understanding site: its output (a tensor whose `.grad` the backward fills) and the mask of its
    visual positions (`None`: every position)."""

    tokens: torch.Tensor
    mask: torch.Tensor | None


class SiteCapture:
    """Keeps, while `recording`, every output of the understanding site that holds visual tokens, with its mask, so
    that the backward leaves their gradient. A call with no visual position (Emu3's `embed_tokens` on the text ids) is
    not kept: nothing depends on which call of the site comes first.

    Args:
        interface ([`VisualTokenInterface`]): The model's interface (its site and the site's mask).
    """

    def __init__(self, interface):
        self.site = interface.understanding_site
        self.mask_fn = interface.site_mask("understanding")
        self.captured: list[CapturedTokens] = []
        self._recording = False
        self._handle = None

    def __enter__(self) -> "SiteCapture":
        self._handle = self.site.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @contextmanager
    def recording(self):
        """Records the site's calls inside this context only (the clean pass, not the perturbed or buffer passes)."""
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def _hook(self, module, args, output):
        # A pass without gradients (a DPO reference forward, a host's metrics forward) has no gradient to keep.
        if not self._recording or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
            return None
        mask = self.mask_fn(module, args, output) if self.mask_fn is not None else None
        if mask is not None and not mask.any():
            return None
        if output.requires_grad:
            output.retain_grad()
            self.captured.append(CapturedTokens(output, mask))
            return None
        leaf = output.detach().requires_grad_(True)  # the site is frozen: a leaf changes nothing upstream
        self.captured.append(CapturedTokens(leaf, mask))
        return leaf

    @staticmethod
    def _clean_rows(t: torch.Tensor, rows: tuple[int, int] | None) -> tuple[torch.Tensor, int | None]:
        """`t` cut to the clean rows of a merged batch (`rows = (clean, total)`), and where it was cut. A site output
        with a batch dimension is cut at `clean`; a flattened one (all images' tokens in a row, Emu3) at the same
        fraction, since rows that share a forward have images of one shape."""
        if rows is None:
            return t, None
        clean, total = rows
        if t.dim() >= 3 and t.shape[0] == total:
            keep = clean
        elif t.dim() == 2 and t.shape[0] % total == 0:
            keep = t.shape[0] // total * clean
        else:
            raise RuntimeError(
                f"The understanding site's output {tuple(t.shape)} cannot be split into {total} rows, so the clean "
                "rows of a merged batch cannot be told apart: set `one_pass_update=False`."
            )
        return t[:keep], keep

    def tokens_and_gradients(self, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The captured visual tokens `(n, hidden)` and the gradient the backward left at each; `None` when it left
        none. With `rows = (clean, total)` (the clean rows first in a batch of `total`), the clean rows' only."""
        tokens, gradients = [], []
        for call in self.captured:
            if call.tokens.grad is None:
                return None
            z, keep = self._clean_rows(call.tokens.detach(), rows)
            g = call.tokens.grad.detach()[: z.shape[0]]
            mask = call.mask if call.mask is None or keep is None else call.mask[:keep]
            if mask is not None:
                z, g = z[mask], g[mask]
            tokens.append(z.reshape(-1, z.shape[-1]))
            gradients.append(g.reshape(-1, g.shape[-1]))
        if not tokens:
            return None
        return torch.cat(tokens), torch.cat(gradients)

    def site_gradient(
        self, loss: torch.Tensor, rows: tuple[int, int] | None = None, retain_graph: bool = False
    ) -> torch.Tensor | None:
        """The gradient of `loss` at the site's output, shaped like the output of its (last) call with visual tokens
        (cut to the clean rows with `rows`), for [`Perturber.gradients`]; a backward down to the visual tokens only,
        leaving no `.grad` anywhere. `None` when nothing was captured."""
        if not self.captured:
            return None
        call = self.captured[-1]
        (gradient,) = torch.autograd.grad(loss, [call.tokens], retain_graph=retain_graph, allow_unused=True)
        if gradient is None:
            return None
        return self._clean_rows(gradient.detach(), rows)[0]


class Adversary:
    """The perturber's player: its optimizer, its ascent and its once-per-window step.

    Args:
        perturber ([`Perturber`]): The perturber, attached to the model.
        args ([`UniGameArguments`]): The run's configuration.
        metrics ([`GameMetrics`]): Where the step's metrics go.
        agreement ([`Agreement`]): Collectives between processes.
    """

    def __init__(self, perturber, args, metrics: GameMetrics, agreement: Agreement):
        self.perturber = perturber
        self.args = args
        self.metrics = metrics
        self.agreement = agreement
        # This step owns the perturber's weight decay whenever it steps (the generation-side step then decays nothing).
        decay = args.perturber_weight_decay if args.adversarial_weight else 0.0
        self.optimizer = perturber_optimizer(perturber, args.perturber_learning_rate, decay)
        self.window_finite = True
        self._warned_precision: set[str] = set()

    @property
    def first_order(self) -> bool:
        return bool(self.args.adversarial_weight) and self.args.perturber_update == "first_order"

    @property
    def exact(self) -> bool:
        return bool(self.args.adversarial_weight) and self.args.perturber_update == "exact"

    def exact_step(self, loss_fn: Callable[[], torch.Tensor], scale: float, window: int, step: int) -> None:
        """Ascent on U's loss with the perturbation active (`perturber_update="exact"`): `loss_fn()` runs the host's
        loss on the clean batch (U frozen for this pass: only the perturber's gradient is computed); `scale` is the
        factor that makes it one micro-batch's share of the window's loss."""
        with self.perturber.active(), self.perturber.recording() as deltas, self.perturber.measuring() as measured:
            adversarial = loss_fn()
        self.log_realized_perturbation(measured)
        if self._ascend(adversarial * scale, deltas, window, step, agree=True):
            # as a mean over the micro-batch, as `unigame/clean_loss` is, whichever way the host normalises
            self.metrics.add("unigame/adversarial_loss", float(adversarial.detach()) * scale * window)

    def first_order_step(
        self, capture: SiteCapture, rows: tuple[int, int] | None, window: int, step: int, loss_scale: float = 1.0
    ) -> None:
        """Ascent on the first-order change of the clean loss, `<g, delta(z)>`, with `g` the gradient at the visual
        tokens `z` that the clean backward has just computed (already a micro-batch's share of the window): no extra
        pass through the model. Only the clean rows' tokens count (`rows`). `loss_scale` is the factor the host's
        backward scaled the loss by (fp16 loss scaling, see `game.precision`): `g` is divided by it, so the ascent and
        its regularisers do not move with the scaler."""
        found = capture.tokens_and_gradients(rows)
        if found is None:
            self.window_finite = False
            self.metrics.skip(step, "perturber", "the clean backward left no gradient at the visual tokens")
            return
        tokens, gradient = found
        gradient = unscaled(gradient, loss_scale)
        with self.perturber.recording() as deltas:
            delta = self.perturber.delta(tokens, "understanding", gradient if self.perturber.sees_gradient else None)
        gain = (gradient.float().to(delta.device) * delta).sum()
        if self._ascend(gain, deltas, window, step):
            self.metrics.add("unigame/adversarial_gain_estimate", float(gain.detach()) * window)

    def _ascend(
        self, adversarial: torch.Tensor, deltas: list[torch.Tensor], window: int, step: int, agree: bool = False
    ) -> bool:
        """Accumulates the perturber's gradient of `-lambda * adversarial + regularisers / window` (`adversarial`
        already a micro-batch's share); returns `False` (and marks the window) when it is not finite.

        With `agree` (the exact step, whose backward runs through the model: under FSDP2 and ZeRO-3 it all-gathers
        each layer's shards), the processes vote first; every process then runs the backward, a non-finite objective
        as a zero with the same graph, and when any process's objective was not finite every process marks the window
        and returns `False`. Without it (the first-order step, whose backward stays in the perturber), the decision
        is this process's, and [`~Adversary.end_window`] makes it for all."""
        args = self.args
        params = list(self.perturber.parameters())
        penalty = torch.zeros((), device=self.perturber.rho.device)
        if deltas:
            if args.delta_reg_weight:
                penalty = (
                    penalty + args.delta_reg_weight * torch.stack([d.pow(2).sum(-1).mean() for d in deltas]).mean()
                )
            if args.tv_reg_weight:
                tv = [
                    (d[..., 1:, :] - d[..., :-1, :]).pow(2).sum(-1).mean()
                    for d in deltas
                    if d.dim() >= 3 and d.shape[-2] > 1
                ]
                if tv:
                    penalty = penalty + args.tv_reg_weight * torch.stack(tv).mean()
            self.metrics.add(
                "unigame/delta_norm", float(torch.cat([d.detach().norm(dim=-1).flatten() for d in deltas]).mean())
            )
        if args.eps_reg_weight:
            penalty = penalty + args.eps_reg_weight * self.perturber.eps_tensor.pow(2)
        objective = -args.adversarial_weight * adversarial + penalty / window
        finite = torch.isfinite(objective)
        own_finite = bool(finite)
        skipped = self.agreement.any_process(not own_finite) if agree else not own_finite
        if agree or not skipped:
            # not `objective * 0` (NaN * 0 is NaN): a zero whose backward walks the same graph, collectives included
            zeroed = torch.where(finite, objective, torch.zeros_like(objective))
            grads = torch.autograd.grad(zeroed, params, allow_unused=True)
        if skipped:
            self.window_finite = False
            why = (
                "the perturber's loss is not finite"
                if not own_finite
                else "another process's perturber loss is not finite"
            )
            self.metrics.skip(step, "perturber", why)
            return False
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        return True

    def end_window(self, step: int) -> None:
        """Steps the perturber once per accumulation window with the gradient averaged over processes, or leaves it
        and its optimizer exactly as they are when any micro-batch of the window, on any process, was not finite (a
        finite loss can still give a non-finite gradient: that window is skipped, warned about and counted too)."""
        params = list(self.perturber.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.window_finite and not bool(all_finite(grads)):
            self.window_finite = False
            self.metrics.skip(step, "perturber", "the perturber's gradient is not finite")
        averaged = self.agreement.mean_if_finite(grads, self.window_finite)
        self.window_finite = True
        if averaged is not None:
            for p, g in zip(params, averaged):
                p.grad = g
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.metrics.add("unigame/eps", self.perturber.eps)

    def log_realized_perturbation(self, measured: dict[str, dict[str, float]]) -> None:
        """Logs what reached the model at each site after the cast to its dtype, and warns once per site when rounding
        has turned the perturbation into something else (cosine to the intended one below `REALIZED_COSINE_WARNING`)."""
        for site, values in measured.items():
            prefix = "unigame/" if site == "understanding" else f"unigame/{site}_"
            for key in ("realized_delta_norm", "realized_delta_cosine", "token_norm"):
                self.metrics.add(prefix + key, values[key])
            if values["realized_delta_cosine"] < REALIZED_COSINE_WARNING and site not in self._warned_precision:
                self._warned_precision.add(site)
                warnings.warn(
                    f"UniGame: at the {site} site only part of the perturbation reaches the model: after the cast to "
                    f"{values['dtype']} its norm is {values['realized_delta_norm']:.3g} (intended "
                    f"{values['intended_delta_norm']:.3g}) and its cosine to the intended direction "
                    f"{values['realized_delta_cosine']:.2f}, on tokens of median norm {values['token_norm']:.3g}. The "
                    "rest is rounding noise, and the perturber's gradient points where the forward pass never went. "
                    "Use a budget relative to the token norm (`perturber_budget='relative'`, e.g. "
                    "`perturber_eps_max=0.05`), or a larger absolute budget."
                )
