"""The generation-side adversary (`generation_adversary="reinforce"`): the perturber learns at the generation site from
what it makes the generator decode, by a score-function (REINFORCE) step on each mining round's own candidates."""

from __future__ import annotations

import torch

from .agreement import Agreement
from .metrics import GameMetrics


# Added to the standard deviation that normalises a round's advantages: a round whose advantages are all 0 stays 0.
ADVANTAGE_STD_EPS = 1e-6


def candidate_rewards(
    hardness: torch.Tensor, consistency: torch.Tensor, threshold: float, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's reward and whether it is faithful: its hardness `H` when its consistency reaches `threshold`,
    else `penalty`.

    Args:
        hardness (`torch.Tensor`): `H` of each candidate, `(N,)`.
        consistency (`torch.Tensor`): The consistency score of each candidate, `(N,)`.
        threshold (`float`): `consistency_threshold`.
        penalty (`float`): `generation_adversary_penalty`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: float32 rewards `(N,)` and the boolean faithfulness mask `(N,)`.
    """
    hardness = hardness.detach().float().cpu()
    faithful = consistency.detach().float().cpu() >= threshold
    return torch.where(faithful, hardness, torch.full_like(hardness, penalty)), faithful


def candidate_advantages(rewards: torch.Tensor, num_candidates: int, normalize: bool) -> torch.Tensor:
    """`reward - mean reward of the candidates of the same prompt` (candidates grouped by prompt, `num_candidates`
    each, as generated), divided by the standard deviation of the advantages with `normalize`."""
    grouped = rewards.view(-1, num_candidates)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    return _normalized(advantages, advantages.new_ones(advantages.shape, dtype=torch.bool)) if normalize else advantages


def faithful_advantages(
    hardness: torch.Tensor, faithful: torch.Tensor, num_candidates: int, normalize: bool
) -> torch.Tensor:
    """`H - mean H of the faithful candidates of the same prompt` for each faithful candidate whose prompt has at
    least two faithful candidates; 0 for every other candidate (an unfaithful one, or the only faithful one of its
    prompt), which the update then leaves out. With `normalize`, divided by the standard deviation over the
    candidates that take part.

    Args:
        hardness (`torch.Tensor`): `H` of each candidate, `(N,)`, grouped by prompt (`num_candidates` each).
        faithful (`torch.Tensor`): Whether each candidate reaches `consistency_threshold`, boolean `(N,)`.
        num_candidates (`int`): Candidates per prompt.
        normalize (`bool`): Divide by the standard deviation of the advantages taking part.

    Returns:
        `torch.Tensor`: float32 advantages `(N,)`.
    """
    h = hardness.detach().float().cpu().view(-1, num_candidates)
    mask = faithful.detach().cpu().bool().view(-1, num_candidates)
    count = mask.sum(dim=1, keepdim=True)
    mean = torch.where(mask, h, torch.zeros_like(h)).sum(dim=1, keepdim=True) / count.clamp(min=1)
    taking_part = mask & (count >= 2)
    advantages = torch.where(taking_part, h - mean, torch.zeros_like(h)).flatten()
    return _normalized(advantages, taking_part.flatten()) if normalize else advantages


def _normalized(advantages: torch.Tensor, taking_part: torch.Tensor) -> torch.Tensor:
    """`advantages / (std over the candidates taking part + eps)`; all 0 when none take part."""
    if not bool(taking_part.any()):
        return advantages
    return advantages / (advantages[taking_part].std(unbiased=False) + ADVANTAGE_STD_EPS)


class GenerationAdversary:
    """The perturber's step at the generation site: REINFORCE on the candidates a mining round has just decoded and
    scored.

    With `generation_adversary_reward="gated"`, each candidate's reward is its hardness for U when it is faithful
    (consistency at least `consistency_threshold`), else `generation_adversary_penalty`, and its advantage is the
    reward minus the mean reward of the candidates of the same prompt. With `"faithful"`, only faithful candidates
    take part: each one's advantage is its hardness minus the mean hardness of the faithful candidates of the same
    prompt (a prompt with fewer than two faithful candidates gives none; a round where none takes part still steps,
    with a zero gradient, along AdamW's momentum). Advantages are optionally normalised. The loss
    `-mean(advantage * log p(tokens))` takes the log-probability of each candidate's sampled image tokens from one
    teacher-forced pass with the perturbation active at the generation site and the sampling's guidance and
    temperature; its gradient is taken for the perturber's parameters only
    (`torch.autograd.grad`), so U's weights and every `.grad` the trainer accumulates stay as they are. The step uses
    its own AdamW (moments apart from the understanding-site step's), and under several processes the gradient is
    averaged across them first; when any process's loss or gradient is not finite, no process steps.

    Args:
        perturber ([`Perturber`]): The perturber, attached to the model.
        interface ([`VisualTokenInterface`]): The model's interface (its teacher-forced pass).
        args ([`UniGameArguments`]): The run's configuration.
        metrics ([`GameMetrics`]): Where the step's metrics go.
        agreement ([`Agreement`]): Collectives between processes.
    """

    def __init__(self, perturber, interface, args, metrics: GameMetrics, agreement: Agreement):
        self.perturber = perturber
        self.interface = interface
        self.args = args
        self.metrics = metrics
        self.agreement = agreement
        self.optimizer = torch.optim.AdamW(
            perturber.parameters(),
            lr=args.generation_adversary_learning_rate,
            weight_decay=args.perturber_weight_decay,
        )

    def log_probs(self, prompts: list[str], tokens: torch.Tensor) -> torch.Tensor:
        """The log-probability of each candidate's sampled tokens `(N,)` under the perturbed generator, with its graph
        (the caller's model in eval mode, as it sampled)."""
        args = self.args
        with torch.enable_grad(), self.perturber.active():
            per_token = self.interface.image_token_log_probs(
                prompts,
                tokens,
                num_images=args.num_candidates,
                guidance_scale=args.generation_guidance_scale,
                temperature=args.generation_temperature,
                image_size=args.mining_image_size,
            )
            return per_token.sum(-1)

    def step(
        self,
        prompts: list[str],
        tokens: torch.Tensor,
        hardness: torch.Tensor,
        consistency: torch.Tensor,
        step: int,
    ) -> None:
        """One update from a mining round: `prompts` (one per row), the candidates' sampled `tokens` grouped by prompt
        (`num_candidates` each), and their `hardness` and `consistency`. Every process calls it in the same round."""
        args = self.args
        rewards, faithful = candidate_rewards(
            hardness, consistency, args.consistency_threshold, args.generation_adversary_penalty
        )
        if args.generation_adversary_reward == "faithful":
            advantages = faithful_advantages(
                hardness, faithful, args.num_candidates, args.generation_adversary_normalize
            )
            rewards = rewards[faithful]  # logged: the faithful candidates' hardness (their gated reward)
        else:
            advantages = candidate_advantages(rewards, args.num_candidates, args.generation_adversary_normalize)
        if len(rewards):
            self.metrics.add("unigame/generation_reward_mean", float(rewards.mean()))
            self.metrics.add("unigame/generation_reward_std", float(rewards.std(unbiased=False)))
        params = list(self.perturber.parameters())
        log_probs = self.log_probs(prompts, tokens)
        with torch.enable_grad():
            loss = -(advantages.to(log_probs.device) * log_probs).mean()
            finite = bool(torch.isfinite(loss))
            grads = torch.autograd.grad(loss, params, allow_unused=True) if finite else [None] * len(params)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        if not finite:
            self.metrics.skip(step, "generation_adversary", "the generation adversary's loss is not finite")
        elif not all(bool(torch.isfinite(g).all()) for g in grads):
            finite = False  # a finite loss can still have a non-finite gradient: skipped, warned and counted too
            self.metrics.skip(step, "generation_adversary", "the generation adversary's gradient is not finite")
        averaged = self.agreement.mean_if_finite(grads, finite)
        if averaged is not None:
            self._apply(params, averaged)
            self.metrics.add("unigame/generation_adversary_loss", float(loss.detach()))
        self.metrics.add("unigame/generation_eps", float(self.perturber.site_eps_tensor("generation").detach()))

    def _apply(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
        """Steps the adversary's optimizer on `grads`, leaving each parameter's `.grad` (the understanding-site step's
        accumulation) as it was."""
        kept = [p.grad for p in params]
        try:
            for p, g in zip(params, grads):
                p.grad = g
            self.optimizer.step()
        finally:
            for p, g in zip(params, kept):
                p.grad = g
