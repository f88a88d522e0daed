"""The generation-side adversary (`generation_adversary="reinforce"`): the perturber learns at the generation site from
what it makes the generator decode, by a score-function (REINFORCE) step on each mining round's own candidates."""

from __future__ import annotations

import torch

from .adversary import perturber_optimizer
from .agreement import Agreement, all_finite
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
    return (
        _normalized(advantages, advantages.new_ones(advantages.shape, dtype=torch.bool)) if normalize else advantages
    )


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
    prompt (a prompt with fewer than two faithful candidates gives none). Advantages are optionally normalised. A
    round where no candidate takes part on any process (every advantage 0) makes no pass and no step: AdamW would
    otherwise move the perturber along its momentum alone. The loss `-mean(advantage * log p(tokens))` takes the
    log-probability of each candidate's sampled image tokens from teacher-forced passes (`generation_adversary_chunk_size`
    candidates each, only those taking part) with the perturbation active at the generation site and the sampling's
    guidance and temperature; its gradient is taken for the perturber's parameters only
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
        # One owner of the perturber's weight decay: the understanding-site step when it steps, else this one.
        decay = 0.0 if args.adversarial_weight else args.perturber_weight_decay
        self.optimizer = perturber_optimizer(perturber, args.generation_adversary_learning_rate, decay)

    def log_probs(self, prompts: list[str], tokens: torch.Tensor) -> torch.Tensor:
        """The log-probability of each candidate's sampled tokens `(N,)` under the perturbed generator, with its graph
        (the caller's model in eval mode, as it sampled): `tokens` grouped by prompt, `N / len(prompts)` each."""
        args = self.args
        with torch.enable_grad(), self.perturber.active():
            per_token = self.interface.image_token_log_probs(
                prompts,
                tokens,
                num_images=len(tokens) // len(prompts),
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
        if not self.agreement.any_process(bool(advantages.any())):
            # No candidate takes part on any process (e.g. no prompt with two faithful candidates): no pass and no
            # step, so AdamW's momentum does not move the perturber on a round that carries no signal.
            self.metrics.add("unigame/generation_eps", float(self.perturber.site_eps_tensor("generation").detach()))
            return
        params = list(self.perturber.parameters())
        loss, grads = self.policy_gradient(prompts, tokens, advantages)
        finite = bool(torch.isfinite(loss))
        if not finite:
            self.metrics.skip(step, "generation_adversary", "the generation adversary's loss is not finite")
        elif not bool(all_finite(grads)):
            finite = False  # a finite loss can still have a non-finite gradient: skipped, warned and counted too
            self.metrics.skip(step, "generation_adversary", "the generation adversary's gradient is not finite")
        averaged = self.agreement.mean_if_finite(grads, finite)
        if averaged is not None:
            self._apply(params, averaged)
            self.metrics.add("unigame/generation_adversary_loss", float(loss.detach()))
        self.metrics.add("unigame/generation_eps", float(self.perturber.site_eps_tensor("generation").detach()))

    def policy_gradient(
        self, prompts: list[str], tokens: torch.Tensor, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss `-mean(advantage * log p(tokens))` over the round's `N` candidates and its gradient for each of the
        perturber's parameters, from teacher-forced passes over the candidates whose advantage is not 0 (the others
        add nothing), `generation_adversary_chunk_size` candidates per pass.

        Each chunk's graph is freed once its gradient is added, so the pass holds one chunk's activations (under the
        run's gradient checkpointing, each layer's input only; see [`~ImageTokenLoop._image_token_log_probs`]) and one
        chunk's full-vocabulary scores; only the sampled tokens' log-probabilities are kept.

        Args:
            prompts (`list[str]`): One per prompt.
            tokens (`torch.Tensor`): The sampled tokens `(N, tokens)`, grouped by prompt (`N / len(prompts)` each).
            advantages (`torch.Tensor`): Each candidate's advantage `(N,)`.

        Returns:
            `tuple[torch.Tensor, list[torch.Tensor]]`: The loss (detached, a scalar) and one gradient per parameter
            (zeros where the loss does not reach it); not finite where a log-probability is not.
        """
        params = list(self.perturber.parameters())
        per_prompt = len(tokens) // len(prompts)
        advantages = advantages.detach().float().cpu()
        taking = advantages.nonzero().flatten().tolist()  # on the host already: no device read
        size = self.args.generation_adversary_chunk_size
        loss = torch.zeros((), device=params[0].device)
        grads = [torch.zeros_like(p) for p in params]
        for start in range(0, len(taking), size):
            rows = taking[start : start + size]
            log_probs = self.log_probs([prompts[i // per_prompt] for i in rows], tokens[rows])
            with torch.enable_grad():
                chunk = -(advantages[rows].to(log_probs.device) * log_probs).sum() / len(advantages)
                chunk_grads = torch.autograd.grad(chunk, params, allow_unused=True)
            for total, g in zip(grads, chunk_grads):
                if g is not None:
                    total.add_(g.detach())
            loss = loss + chunk.detach().to(loss.device)
        return loss, grads

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
