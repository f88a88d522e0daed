"""The generation-side adversary (`generation_adversary="reinforce"`): its teacher-forced log-probability, its update,
its place in the trainer (Janus and Emu3, logs, exact resume) and the options it refuses."""

import copy
import os
import warnings

import pytest
import torch
from host_reads import HostReads
from peft import LoraConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from trl_unigame import Perturber, UniGameConfig, UniGameTrainer, get_interface
from trl_unigame.game.generation_adversary import candidate_advantages, candidate_rewards, faithful_advantages
from trl_unigame.testing import tiny_emu3, tiny_janus, tiny_llava


BUILDERS = {"janus": tiny_janus, "emu3": tiny_emu3}
GUIDANCE, TEMPERATURE = 3.0, 0.7
NEW_METRICS = (
    "unigame/generation_adversary_loss",
    "unigame/generation_reward_mean",
    "unigame/generation_reward_std",
    "unigame/generation_eps",
    "unigame/generation_realized_delta_norm",
    "unigame/faithful_fraction",
    "unigame/faithful_hardness",
    "unigame/kept_hardness",
    "unigame/skipped_generation_adversary_steps",
)


def game_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=5e-3,
        perturber_learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        num_candidates=2,
        buffer_batch_size=2,
        buffer_capacity=4,
        hardness_quantile=0.0,
        consistency_threshold=-1.0,
        consistency_model=None,
        seed=0,
        dataloader_num_workers=0,
        generation_adversary="reinforce",
        generation_adversary_learning_rate=5e-2,
        generation_temperature=TEMPERATURE,
        generation_guidance_scale=GUIDANCE,
    )
    settings.update(overrides)
    return UniGameConfig(**settings)


def game_trainer(family, tmp_path, vqa, scorer, perturber=None, **overrides):
    model, processor = BUILDERS[family](seed=0)
    return UniGameTrainer(
        model,
        game_args(tmp_path, **overrides),
        train_dataset=vqa.select(range(8)),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05),
        consistency_scorer=scorer,
        perturber=perturber,
    )


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def sample_candidates(trainer, prompts, num_images, seed=0):
    """Candidates sampled as mining samples them (perturber active, seeded), and their log-probabilities under the
    generation adversary's teacher-forced pass."""
    with torch.no_grad(), trainer.perturber.active():
        _, tokens = trainer.interface.generate_images(
            prompts,
            num_images=num_images,
            guidance_scale=GUIDANCE,
            temperature=TEMPERATURE,
            generator=torch.Generator().manual_seed(seed),
            return_tokens=True,
        )
        return tokens, trainer.generation_adversary.log_probs(prompts, tokens)


def sampled_with_log_probs(interface, prompts, num_images, seed=0):
    """Samples through the interface's own loop, recording the scores it sampled each token from; returns the tokens
    and the log-probability of each under that recorded distribution (0 at forced tokens)."""
    if hasattr(interface, "_generating"):  # Emu3: the grid is part of the loop's arguments
        loop, _ = interface._generation_loop(prompts, None)
        context = interface._generating()
    else:
        loop = interface._generation_loop(prompts, interface.generation_grid())
        context = torch.no_grad()
    recorded, scores = [], loop["image_scores"]

    def recording(hidden):
        out = scores(hidden)
        recorded.append(out.float())
        return out

    with context, torch.no_grad():
        tokens = interface._generate_image_tokens(
            **{**loop, "image_scores": recording},
            num_images=num_images,
            guidance_scale=GUIDANCE,
            temperature=TEMPERATURE,
            generator=torch.Generator().manual_seed(seed),
        )
    batch, forced = tokens.shape[0], loop.get("forced_token")
    candidates = loop.get("candidate_ids")
    expected = torch.zeros(tokens.shape)
    steps = iter(recorded)
    for i in range(tokens.shape[1]):
        if forced is not None and forced(i) is not None:
            continue
        s = next(steps)
        log_probs = torch.log_softmax((s[batch:] + GUIDANCE * (s[:batch] - s[batch:])) / TEMPERATURE, dim=-1)
        columns = tokens[:, i] if candidates is None else torch.searchsorted(candidates, tokens[:, i].contiguous())
        expected[:, i] = log_probs.gather(-1, columns[:, None])[:, 0]
    return tokens, expected


@pytest.mark.parametrize("row_scales", [None, [6.0, 0.5]], ids=["one-budget", "row-scales"])
@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_teacher_forced_log_probs_equal_the_sampling_distribution(family, row_scales):
    model, processor = BUILDERS[family](seed=0)
    model.eval()
    interface = get_interface(model, processor)
    site_budgets = None if row_scales is None else {"generation": {"row_scales": row_scales}}
    perturber = Perturber.for_model(
        model, sites=["generation"], eps_max=0.5, eps_init=0.4, site_budgets=site_budgets
    ).attach(model)
    prompts = ["A red circle.", "A small blue square on the left."]  # different lengths: left padding
    kwargs = dict(num_images=2, guidance_scale=GUIDANCE, temperature=TEMPERATURE)
    with perturber.active():
        tokens, expected = sampled_with_log_probs(interface, prompts, num_images=2)
        generator = torch.Generator().manual_seed(0)
        _, returned = interface.generate_images(prompts, **kwargs, generator=generator, return_tokens=True)
        teacher_forced = interface.image_token_log_probs(prompts, tokens, **kwargs)
    assert torch.equal(returned, tokens)  # the sampling path returns the tokens it decoded
    torch.testing.assert_close(teacher_forced, expected, rtol=0, atol=1e-4)
    assert teacher_forced.requires_grad and (teacher_forced <= 0).all()
    with perturber.disabled():  # the pass goes through the generation site: the perturber's tokens are its own
        clean = interface.image_token_log_probs(prompts, tokens, **kwargs)
    assert (clean - teacher_forced).abs().max() > 1e-3
    with pytest.raises(ValueError, match="Greedy"):
        interface.image_token_log_probs(prompts, tokens, num_images=2, temperature=0.0)


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_row_scales_multiply_the_generation_budget_row_by_row(family):
    model, processor = BUILDERS[family](seed=0)
    model.eval()
    interface = get_interface(model, processor)
    perturber = Perturber.for_model(
        model, sites=["generation"], eps_max=0.5, eps_init=0.4, site_budgets={"generation": {"row_scales": [3.0, 0.5]}}
    ).attach(model)
    eps = float(perturber.site_eps_tensor("generation").detach())
    prompts, kwargs = ["A red circle."], dict(num_images=2, guidance_scale=GUIDANCE, temperature=TEMPERATURE)
    with perturber.active(), perturber.recording() as deltas:
        _, tokens = interface.generate_images(
            prompts, **kwargs, generator=torch.Generator().manual_seed(0), return_tokens=True
        )
    # the loop embeds every sampled token, one at a time (conditional and unconditional rows): each delta's norm is
    # eps times the factor of the token's grid row (absolute budget)
    per_row = len(tokens[0]) // interface.generation_grid()  # Emu3's rows end with an end-of-line token
    fed_visual = [i for i in range(tokens.shape[1]) if family == "janus" or (i + 1) % per_row]
    norms = [float(d.norm(dim=-1).mean()) for d in deltas]
    assert len(norms) == len(fed_visual)
    expected = [eps * ([3.0, 0.5] + [1.0] * 99)[i // per_row] for i in fed_visual]
    assert norms == pytest.approx(expected, rel=1e-4)
    with perturber.recording() as deltas, torch.no_grad():
        interface.image_token_log_probs(prompts, tokens, **kwargs)  # the teacher-forced pass: every row at once
    (delta,) = deltas
    assert sorted({round(float(n) / eps, 3) for n in delta.norm(dim=-1).flatten()}) == [0.5, 1.0, 3.0]
    if family == "janus":  # every position of the pass: (2 x candidates, tokens - 1), token j on row j // grid
        factors = torch.tensor([([3.0, 0.5] + [1.0] * 99)[j // per_row] for j in range(tokens.shape[1] - 1)])
        torch.testing.assert_close(delta.norm(dim=-1), (eps * factors).expand(delta.shape[:-1]), rtol=1e-4, atol=0)
    # outside image generation (no grid rows) the site's budget is the plain one
    ids = tokens[:, :3] if family == "janus" else None
    if ids is not None:
        with perturber.recording() as deltas, torch.no_grad():
            model.prepare_embeddings_for_image_generation(ids)
        assert float(deltas[0].norm(dim=-1).max()) == pytest.approx(eps, rel=1e-4)


def test_rewards_gate_hardness_by_faithfulness_and_advantages_centre_per_prompt():
    rewards, faithful = candidate_rewards(
        torch.tensor([2.0, 1.0, 5.0, 0.5]), torch.tensor([0.9, 0.95, 0.2, 0.9]), threshold=0.5, penalty=-1.0
    )
    assert rewards.tolist() == [2.0, 1.0, -1.0, 0.5] and faithful.tolist() == [True, True, False, True]
    advantages = candidate_advantages(rewards, num_candidates=2, normalize=False)
    assert advantages.tolist() == [0.5, -0.5, -0.75, 0.75]
    normalised = candidate_advantages(rewards, num_candidates=2, normalize=True)
    assert normalised.std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert candidate_advantages(torch.full((4,), -1.0), 2, normalize=True).abs().max() == 0


def test_faithful_advantages_leave_out_unfaithful_candidates_and_lone_faithful_ones():
    hardness = torch.tensor([3.0, 1.0, 9.0, 2.0, 7.0, 8.0, 4.0, 6.0, 5.0])
    consistency = torch.tensor([0.9, 0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.9, 0.9])
    faithful = consistency >= 0.5
    advantages = faithful_advantages(hardness, faithful, num_candidates=3, normalize=False)
    # prompt 0: the faithful pair against its own mean (2), the hard unfaithful one left out; prompt 1: one faithful
    # candidate, nothing to compare it with; prompt 2: all three against their mean (5)
    assert advantages.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0]
    normalised = faithful_advantages(hardness, faithful, num_candidates=3, normalize=True)
    taking_part = torch.tensor([True, True, False, False, False, False, True, True, True])
    assert normalised[taking_part].std(unbiased=False) == pytest.approx(1.0, abs=1e-5)
    assert normalised[~taking_part].abs().max() == 0
    assert faithful_advantages(hardness, torch.zeros(9, dtype=torch.bool), 3, normalize=True).abs().max() == 0


def test_faithful_reward_moves_probability_between_faithful_candidates_only(tmp_path, vqa, clip_scorer):
    trainer = game_trainer(
        "janus",
        tmp_path,
        vqa,
        clip_scorer,
        num_candidates=3,
        consistency_threshold=0.0,
        generation_adversary_reward="faithful",
        generation_adversary_learning_rate=1e-3,
    )
    trainer.model.eval()
    adversary = trainer.generation_adversary
    prompts = ["A red circle."]
    tokens, before = sample_candidates(trainer, prompts, num_images=3)
    # faithful and hard, faithful and easy, unfaithful and hardest: the gated reward would push the third down (its
    # penalty), the faithful one leaves it out, so only the first two candidates' probabilities drive the step
    hardness, consistency = torch.tensor([3.0, 1.0, 9.0]), torch.tensor([1.0, 1.0, -1.0])
    advantages = faithful_advantages(hardness, consistency >= 0.0, 3, normalize=True)
    assert advantages[2] == 0 and advantages[0] > 0 > advantages[1]
    start = snapshot(trainer.perturber), copy.deepcopy(adversary.optimizer.state_dict())

    def update(reward, third_counts=True):
        """The perturber after one step from `start` with `reward`, the third candidate's log-probability cut off
        from the graph unless `third_counts`."""
        with torch.no_grad():
            for n, p in trainer.perturber.named_parameters():
                p.copy_(start[0][n])
        adversary.optimizer.load_state_dict(copy.deepcopy(start[1]))
        trainer.args.generation_adversary_reward = reward
        log_probs = adversary.log_probs

        def third_cut_off(chunk_prompts, chunk_tokens):  # the passes take only the candidates that take part
            values = log_probs(chunk_prompts, chunk_tokens)
            return torch.where((chunk_tokens == tokens[2]).all(-1), values.detach(), values)

        if not third_counts:
            adversary.log_probs = third_cut_off
        try:
            adversary.step(prompts, tokens, hardness, consistency, step=0)
        finally:
            adversary.log_probs = log_probs
        return snapshot(trainer.perturber)

    faithful = update("faithful")
    with torch.no_grad():
        after = adversary.log_probs(prompts, tokens)
    assert after[0] - after[1] > before[0] - before[1], (before, after)
    logged = trainer.game_metrics.reduce()
    assert logged["unigame/generation_reward_mean"] == pytest.approx(2.0)  # the faithful candidates' mean H
    # the unfaithful candidate takes no part: the update is the same with its log-probability cut off the graph,
    # where the gated reward's is not
    without_third = update("faithful", third_counts=False)
    assert all(torch.equal(faithful[n], without_third[n]) for n in faithful)
    gated, gated_without_third = update("gated"), update("gated", third_counts=False)
    assert any(not torch.equal(gated[n], gated_without_third[n]) for n in gated)


def test_a_round_where_no_candidate_takes_part_leaves_the_perturber_and_its_optimizer_alone(
    tmp_path, vqa, clip_scorer
):
    trainer = game_trainer("janus", tmp_path, vqa, clip_scorer, num_candidates=2, consistency_threshold=0.5)
    trainer.model.eval()
    adversary = trainer.generation_adversary
    prompts = ["A red circle.", "A small blue square."]
    tokens, _ = sample_candidates(trainer, prompts, num_images=2)
    passes, log_probs = [], adversary.log_probs
    adversary.log_probs = lambda p, t: passes.append(len(t)) or log_probs(p, t)
    before = snapshot(trainer.perturber)
    hardness = torch.tensor([2.0, 1.0, 3.0, 0.5])
    # one faithful candidate per prompt: no prompt has two to compare, so no advantage, on the only process
    adversary.step(prompts, tokens, hardness, torch.tensor([0.9, 0.1, 0.1, 0.9]), step=0)
    assert not passes and not adversary.optimizer.state
    assert all(torch.equal(before[n], p) for n, p in trainer.perturber.named_parameters())
    logged = trainer.game_metrics.reduce()
    assert "unigame/generation_adversary_loss" not in logged and "unigame/generation_eps" in logged
    assert logged["unigame/generation_reward_mean"] == pytest.approx(1.25)  # still logged: the faithful ones' H
    # the same round where another process has candidates that take part: every process steps on the averaged
    # gradient (this one adds zeros without a pass of its own), so the processes' perturbers stay the same
    votes, any_process = [], adversary.agreement.any_process
    adversary.agreement.any_process = lambda flag: votes.append(flag) or True
    try:
        adversary.step(prompts, tokens, hardness, torch.tensor([0.9, 0.1, 0.1, 0.9]), step=1)
    finally:
        adversary.agreement.any_process = any_process
    assert votes == [False] and not passes and adversary.optimizer.state
    adversary.step(prompts, tokens, hardness, torch.tensor([0.9, 0.9, 0.1, 0.9]), step=2)  # prompt 0 has two
    assert passes == [2]  # only the two candidates that take part


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_chunked_checkpointed_passes_give_the_log_probs_and_gradient_of_one_plain_pass(
    family, tmp_path, vqa, clip_scorer
):
    trainer = game_trainer(family, tmp_path, vqa, clip_scorer, num_candidates=3)
    trainer.model.eval()  # as in mining; LoRA's dropout (0.05) must stay off under checkpointing too
    adversary = trainer.generation_adversary
    prompts = ["A red circle.", "A small blue square on the left."]
    tokens, _ = sample_candidates(trainer, prompts, num_images=3)
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, -0.5])  # the third takes no part
    base = adversary.interface.base_model
    language_model = base.model.language_model if family == "janus" else base.model.text_model
    layers = [m for m in language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    runs = []
    for layer in layers:  # each run of a layer's MLP, recomputations included (a checkpoint's recompute stops inside
        # the MLP, once it has what the backward needs: a pre-hook sees it)
        layer.mlp.register_forward_pre_hook(lambda *a: runs.append(1))

    def pass_(chunk_size):
        runs.clear()
        trainer.args.generation_adversary_chunk_size = chunk_size
        loss, grads = adversary.policy_gradient(prompts, tokens, advantages)
        with torch.enable_grad():
            per_candidate = torch.cat(
                [adversary.log_probs([prompts[i // 3]], tokens[i : i + 1]) for i in range(len(tokens))]
            )
        return loss, grads, per_candidate.detach(), len(runs)

    plain_loss, plain_grads, plain_log_probs, plain_runs = pass_(chunk_size=6)
    with torch.enable_grad():
        whole = adversary.log_probs(prompts, tokens).detach()
    torch.testing.assert_close(plain_log_probs, whole, rtol=0, atol=1e-5)  # one candidate per pass or all at once
    # the run's gradient checkpointing, reentrant (which `torch.autograd.grad` cannot use: the pass swaps it)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    loss, grads, log_probs, checkpointed_runs = pass_(chunk_size=1)
    assert not any(layer.training for layer in base.modules())  # eval mode as it was
    torch.testing.assert_close(log_probs, plain_log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain_grads)
    for g, expected in zip(grads, plain_grads):
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)
    # plain: one run per layer for the one pass (5 candidates taking part) and 6 for the log-probabilities; chunked and
    # checkpointed: 5 passes, each layer run again in its backward, and 6
    assert plain_runs == len(layers) * (1 + 6)
    assert checkpointed_runs == len(layers) * (5 * 2 + 6)


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_the_token_loop_of_a_mining_round_reads_nothing_back_to_the_host(family, tmp_path, vqa, clip_scorer):
    trainer = game_trainer(family, tmp_path, vqa, clip_scorer, max_steps=1, perturber_generation_row_scales=[2.0])
    interface = trainer.interface
    loop, reads, fed = interface._generate_image_tokens, HostReads(), []

    def counted_loop(**kwargs):
        """The loop, with the host reads counted from its first fed-back token to its last (its prompt step before
        and its one check after are once a round)."""
        embed, num_tokens, calls = kwargs["embed_image_tokens"], kwargs["num_tokens"], []

        def embed_and_count(ids):
            calls.append(1)
            fed.append(1)
            reads.counting = len(calls) < num_tokens  # on from the first fed-back token, off at the last
            return embed(ids)

        reads.counting = False
        with reads, reads.tolist_counted():
            return loop(**{**kwargs, "embed_image_tokens": embed_and_count})

    interface._generate_image_tokens = counted_loop
    trainer.train()
    assert len(fed) >= interface.generation_grid() ** 2  # a mining round ran, its loop fed back every token
    assert reads.total == 0, f"host reads in the token loop: {dict(reads.counts)}"
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["unigame/generation_realized_delta_cosine"] == pytest.approx(1.0, abs=1e-3)  # read once, after it


def test_one_update_follows_the_advantages_and_touches_only_the_perturber(tmp_path, vqa, clip_scorer):
    trainer = game_trainer(
        "janus",
        tmp_path,
        vqa,
        clip_scorer,
        num_candidates=2,
        consistency_threshold=0.0,
        generation_adversary_reward="gated",
        generation_adversary_learning_rate=1e-3,  # a small step: the first-order effect of the gradient shows
    )
    trainer.model.eval()  # as in mining: no dropout between the two measurements
    adversary = trainer.generation_adversary
    prompts = ["A red circle."]
    tokens, before = sample_candidates(trainer, prompts, num_images=2)
    # U's accumulated gradients and the understanding-site step's, as they are mid-window
    for p in list(trainer.model.parameters()) + list(trainer.perturber.parameters()):
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.125)
    model_before, perturber_before = snapshot(trainer.model), snapshot(trainer.perturber)
    grads_before = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    # the first candidate is hard and faithful (advantage > 0), the second unfaithful (advantage < 0)
    adversary.step(prompts, tokens, torch.tensor([3.0, 3.0]), torch.tensor([1.0, -1.0]), step=0)
    with torch.no_grad():
        after = adversary.log_probs(prompts, tokens)
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    assert after[0] - after[1] > before[0] - before[1]
    model_after = snapshot(trainer.model)
    assert all(torch.equal(model_before[n], model_after[n]) for n in model_before)
    assert grads_before and all(
        torch.equal(p.grad, grads_before[n]) for n, p in trainer.model.named_parameters() if n in grads_before
    )
    assert all(torch.equal(p.grad, torch.full_like(p, 0.125)) for p in trainer.perturber.parameters())
    assert any(not torch.equal(perturber_before[n], p) for n, p in trainer.perturber.named_parameters())
    assert adversary.optimizer.state and not trainer.perturber_optimizer.state  # moments kept apart
    logged = trainer.game_metrics.reduce()
    assert logged["unigame/generation_reward_mean"] == pytest.approx(1.0)  # (3 + -1) / 2
    assert logged["unigame/skipped_generation_adversary_steps"] == 0


def test_a_non_finite_loss_skips_the_update(tmp_path, vqa, clip_scorer):
    trainer = game_trainer("janus", tmp_path, vqa, clip_scorer)
    trainer.model.eval()
    prompts = ["A red circle."]
    with torch.no_grad():
        _, tokens = trainer.interface.generate_images(prompts, num_images=2, return_tokens=True)
    before = snapshot(trainer.perturber)
    with pytest.warns(UserWarning, match="generation adversary's loss is not finite"):
        trainer.generation_adversary.step(
            prompts, tokens, torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]), step=0
        )
    assert all(torch.equal(before[n], p) for n, p in trainer.perturber.named_parameters())
    assert not trainer.generation_adversary.optimizer.state
    assert trainer.game_metrics.reduce()["unigame/skipped_generation_adversary_steps"] == 1


def test_a_non_finite_gradient_of_a_finite_loss_skips_the_update_with_a_warning(tmp_path, vqa, clip_scorer):
    trainer = game_trainer("janus", tmp_path, vqa, clip_scorer)
    trainer.model.eval()
    prompts = ["A red circle."]
    with torch.no_grad():
        _, tokens = trainer.interface.generate_images(prompts, num_images=2, return_tokens=True)
    before = snapshot(trainer.perturber)
    handle = trainer.perturber.rho.register_hook(lambda g: g * float("nan"))  # the loss stays finite
    try:
        with pytest.warns(UserWarning, match="generation adversary's gradient is not finite"):
            trainer.generation_adversary.step(
                prompts, tokens, torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0]), step=0
            )
    finally:
        handle.remove()
    assert all(torch.equal(before[n], p) for n, p in trainer.perturber.named_parameters())
    assert not trainer.generation_adversary.optimizer.state
    logged = trainer.game_metrics.reduce()
    assert logged["unigame/skipped_generation_adversary_steps"] == 1
    assert "unigame/generation_adversary_loss" not in logged


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_trainer_trains_the_perturber_from_mining_logs_and_resumes_exactly(family, tmp_path, vqa, clip_scorer):
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = game_trainer(family, tmp_path / "full", vqa, clip_scorer, **overrides)
    before = snapshot(full.model)
    steps, changed = [], []
    step = full.generation_adversary.step

    def watched(*args, **kwargs):  # the perturber as the round's update found it and as it left it
        steps.append(args[-1])
        perturber = snapshot(full.perturber)
        step(*args, **kwargs)
        changed.append([n for n, p in full.perturber.named_parameters() if not torch.equal(perturber[n], p)])

    full.generation_adversary.step = watched
    full.train()
    assert steps == [0, 1, 2, 3]  # once per mining round
    assert all(changed), changed  # each round's update moved the perturber
    moved = [n for n, p in full.model.named_parameters() if not torch.equal(before[n], p)]
    assert moved and all("lora_" in n for n in moved)
    logs = [log for log in full.state.log_history if "loss" in log]
    for key in NEW_METRICS:
        assert all(key in log for log in logs), key
    assert all(log["unigame/faithful_fraction"] == 1.0 for log in logs)  # threshold -1: every candidate is faithful
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-2")
    assert "generation_adversary_optimizer.pt" in os.listdir(checkpoint)

    resumed = game_trainer(family, tmp_path / "resumed", vqa, clip_scorer, **overrides)
    resumed.train(resume_from_checkpoint=checkpoint)
    for a, b in ((full.model, resumed.model), (full.perturber, resumed.perturber)):
        sa, sb = snapshot(a), snapshot(b)
        for name in sa:
            torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=1e-6, msg=name)
    state_a, state_b = (t.generation_adversary_optimizer.state_dict()["state"] for t in (full, resumed))
    for index, values in state_a.items():
        for key, value in values.items():
            torch.testing.assert_close(state_b[index][key], value, rtol=0, atol=1e-6)

    def late(trainer):
        return [
            (log["step"], log["unigame/generation_adversary_loss"], log["unigame/generation_reward_mean"])
            for log in trainer.state.log_history
            if "loss" in log and log["step"] > 2
        ]

    assert len(late(full)) == 2
    for (s1, l1, r1), (s2, l2, r2) in zip(late(full), late(resumed)):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6) and r1 == pytest.approx(r2, abs=1e-6)


def test_resume_with_the_option_from_a_checkpoint_without_it_is_refused(tmp_path, vqa, clip_scorer):
    first = game_trainer(
        "janus", tmp_path / "first", vqa, clip_scorer, generation_adversary="none", save_strategy="steps", save_steps=2
    )
    first.train()
    resumed = game_trainer("janus", tmp_path / "again", vqa, clip_scorer, max_steps=4)
    before = snapshot(resumed.perturber)
    with pytest.raises(FileNotFoundError, match="no generation_adversary_optimizer.pt"):
        resumed.train(resume_from_checkpoint=os.path.join(first.args.output_dir, "checkpoint-2"))
    assert all(torch.equal(before[n], p) for n, p in resumed.perturber.named_parameters())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(generation_adversary="ppo"), r"`generation_adversary` must be one of \['none', 'reinforce'\]"),
        (dict(mining_interval=0), r"needs mining.*`mining_interval` >= 1.*generation_adversary='none'"),
        (dict(num_candidates=1, candidates_kept_per_sample=1), r"`num_candidates` >= 2"),
        (dict(generation_temperature=0.0), r"positive `generation_temperature`"),
        (dict(perturber_sites=["understanding"]), r"add 'generation' to `perturber_sites`"),
        (dict(generation_adversary_learning_rate=0.0), r"`generation_adversary_learning_rate` must be > 0"),
        (dict(generation_adversary_penalty=0.5), r"`generation_adversary_penalty` must be a finite number <= 0"),
        (dict(perturber_generation_row_scales=[2.0, 0.0]), r"`perturber_generation_row_scales` must be None or a"),
        (dict(perturber_generation_row_scales=2.0), r"`perturber_generation_row_scales` must be None or a"),
        (
            dict(generation_adversary_reward="clip"),
            r"`generation_adversary_reward` must be one of \['gated', 'faithful'\]",
        ),
    ],
)
def test_config_refuses_what_the_option_cannot_use(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        game_args(tmp_path, **overrides)


def test_trainer_refuses_the_option_without_a_scorer_a_generator_or_a_generation_site(tmp_path, vqa, clip_scorer):
    with pytest.raises(ValueError, match=r"rewards only faithful candidates.*no(ne)?.*consistency_scorer"):
        game_trainer("janus", tmp_path, vqa, scorer=None)
    model, _ = tiny_janus(seed=0)
    understanding_only = Perturber.for_model(model, sites=["understanding"])
    with pytest.raises(ValueError, match=r"acts only at \['understanding'\]"):
        game_trainer("janus", tmp_path, vqa, clip_scorer, perturber=understanding_only)
    model, processor = tiny_llava(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"LlavaForConditionalGeneration cannot generate images"):
            UniGameTrainer(
                model,
                game_args(tmp_path),
                train_dataset=vqa.select(range(4)),
                processing_class=processor,
                consistency_scorer=clip_scorer,
            )


@pytest.mark.slow
def test_benchmark_runs_the_trainer_with_the_option_off_and_on(tmp_path):
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import generation_adversary

    output = tmp_path / "report.json"
    report = generation_adversary.main(
        ["--steps", "1", "--batch_size", "2", "--num_candidates", "2", "--output_json", str(output)]
    )
    assert [r["setting"] for r in report["results"]] == ["off", "faithful"]
    off, on = report["results"]
    assert off["mined"] == on["mined"] == 4 and off["generation_reward_mean"] != off["generation_reward_mean"]  # nan
    assert 0 <= on["faithful_fraction"] <= 1 and len(on["faithful_hardness_by_step"]) <= 1
    assert json.loads(output.read_text())["results"][1]["setting"] == "faithful"


@pytest.mark.slow
def test_the_faithful_reward_makes_the_digits_model_draw_harder_faithful_candidates(tmp_path):
    """The option's purpose: the pretrained digits Janus with U frozen, mining every step with the digit judge
    (threshold 0.9), the generation budget at 20% of the token norm, 150 steps with the option off and with
    `generation_adversary_reward="faithful"` from the same seed and rows, on seeds 0, 1 and 2. The understanding-site
    step is off (`adversarial_weight=0`), so the option's step is the only thing that moves the perturber: in the full
    game both steps move the same parameters and the runs with and without the option part ways, so the difference of
    one run pair swings in sign from seed to seed (docs/benchmarks.md). Over the second half of the runs, the
    candidates the judge accepts are harder for U with the option on, on average over the seeds."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import generation_adversary

    rises = []
    for seed in (0, 1, 2):
        report = generation_adversary.main(
            ["--steps", "150", "--seed", str(seed), "--settings", "off", "faithful"]
            + ["--set", "perturber_generation_eps_max=0.2", "adversarial_weight=0.0"]
        )
        off, on = report["results"]
        assert off["setting"] == "off" and on["setting"] == "faithful"
        assert on["mined"] == off["mined"] == 150 * 8 * 3
        assert on["faithful_fraction"] > 0.3  # still drawing digits the judge accepts
        rises.append(on["faithful_hardness_late"] - off["faithful_hardness_late"])
    assert sum(rises) / len(rises) > 0.02, rises
