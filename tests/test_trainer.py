import copy
import os

import pytest
import torch
from peft import LoraConfig

from trl_unigame import HardSampleBuffer, UniGameConfig, UniGameTrainer, select_hard_candidates
from trl_unigame.data import ROWS_KEY
from trl_unigame.game.adversary import SiteCapture
from trl_unigame.testing import tiny_janus


def make_args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-3,
        perturber_learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        num_candidates=2,
        buffer_batch_size=2,
        consistency_threshold=-1.0,
        consistency_model=None,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return UniGameConfig(**defaults)


def make_trainer(tmp_path, vqa, lora_dropout=0.05, scorer=None, collator=None, **overrides):
    model, processor = tiny_janus(seed=0)
    return UniGameTrainer(
        model,
        make_args(tmp_path, **overrides),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout),
        consistency_scorer=scorer,
        data_collator=collator,
    )


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return batch


def test_lora_moves_frozen_stays_and_perturber_learns(tmp_path, vqa, clip_scorer):
    trainer = make_trainer(tmp_path, vqa, scorer=clip_scorer, max_steps=2)
    before = snapshot(trainer.model)
    perturber_before = snapshot(trainer.perturber)
    trainer.train()
    after = snapshot(trainer.model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_" in n for n in moved)
    assert all(not torch.equal(perturber_before[n], p) for n, p in snapshot(trainer.perturber).items())
    logs = [log for log in trainer.state.log_history if "unigame/eps" in log]
    for key in (
        "unigame/clean_loss",
        "unigame/adversarial_loss",
        "unigame/eps",
        "unigame/delta_norm",
        "unigame/buffer_size",
        "unigame/mined",
        "unigame/kept_fraction",
        "unigame/consistency",
        "unigame/skipped_perturber_steps",
        "unigame/skipped_understanding_steps",
    ):
        assert key in logs[0], key
    assert "unigame/buffer_loss" in logs[-1]


def test_perturber_step_raises_the_adversarial_loss(tmp_path, vqa):
    from trl_unigame.game.context import StepContext

    trainer = make_trainer(tmp_path, vqa, lora_dropout=0.0, perturber_learning_rate=1e-2)
    batch = first_batch(trainer)
    batch.pop(ROWS_KEY)
    inputs = trainer._prepare_inputs(batch)
    model = trainer.model
    model.eval()  # no dropout, so the loss is a function of the perturber alone

    def adversarial_loss():
        with torch.no_grad(), trainer.perturber.active():
            return trainer._host_loss(model, inputs).item()

    lora_before = snapshot(model)
    before = adversarial_loss()
    for _ in range(3):
        step = StepContext(inputs=inputs, rows=None, step=0, window=1, last_micro_batch=True)
        trainer._exact_perturber_step(model, step)
        trainer.adversary.end_window(0)
    after = adversarial_loss()
    assert after > before
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(lora_before[n], p) for n, p in snapshot(model).items())


def test_a_finite_window_with_a_non_finite_perturber_gradient_is_skipped_with_a_warning(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa)
    adversary, perturber = trainer.adversary, trainer.perturber
    before = snapshot(perturber)
    for p in perturber.parameters():
        p.grad = torch.ones_like(p)
    perturber.rho.grad = torch.tensor(float("inf"))  # the losses were finite, one gradient is not
    assert adversary.window_finite
    with pytest.warns(UserWarning, match="step 3: the perturber's gradient is not finite"):
        adversary.end_window(3)
    assert all(torch.equal(before[n], p) for n, p in snapshot(perturber).items())
    assert all(p.grad is None for p in perturber.parameters()) and not adversary.optimizer.state
    assert trainer.game_metrics.reduce()["unigame/skipped_perturber_steps"] == 1
    assert adversary.window_finite  # the next window starts afresh


def test_buffer_fills_is_sampled_and_respects_capacity(tmp_path, vqa):
    trainer = make_trainer(
        tmp_path, vqa, buffer_capacity=3, max_steps=4, hardness_quantile=0.0, candidates_kept_per_sample=2
    )
    sampled = []
    original = trainer.buffer.sample
    trainer.buffer.sample = lambda k: sampled.append(original(k)) or sampled[-1]
    trainer.train()
    assert len(trainer.buffer) == 3
    assert any(len(s) == 2 for s in sampled)
    hardness = [e.hardness for e in trainer.buffer.entries]
    assert hardness == sorted(hardness, reverse=True)
    assert all(e.image.dtype == torch.uint8 and e.image.shape[0] == 3 for e in trainer.buffer.entries)


def test_eps_stays_within_bounds_under_a_large_perturber_lr(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, perturber_learning_rate=10.0, max_steps=4, mining_interval=0)
    trainer.train()
    assert 0.0 <= trainer.perturber.eps <= 0.02
    eps = [log["unigame/eps"] for log in trainer.state.log_history if "unigame/eps" in log]
    assert all(0.0 <= e <= 0.02 for e in eps)


def test_gradient_accumulation_matches_larger_batch(tmp_path, vqa):
    results = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        trainer = make_trainer(
            tmp_path / f"{batch_size}",
            vqa,
            lora_dropout=0.0,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            buffer_weight=0.0,
        )
        trainer.train()
        results.append(snapshot(trainer.model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_matches_an_uninterrupted_run(tmp_path, vqa):
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, buffer_capacity=4, hardness_quantile=0.0)
    full = make_trainer(tmp_path / "full", vqa, **overrides)
    full.train()
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-2")
    assert {"perturber", "perturber_optimizer.pt", "unigame_buffer_rank0.safetensors"} <= set(os.listdir(checkpoint))
    assert {"config.json", "model.safetensors"} <= set(os.listdir(os.path.join(checkpoint, "perturber")))

    resumed = make_trainer(tmp_path / "resumed", vqa, **overrides)
    resumed.train(resume_from_checkpoint=checkpoint)
    for a, b in ((full.model, resumed.model), (full.perturber, resumed.perturber)):
        sa, sb = snapshot(a), snapshot(b)
        for name in sa:
            torch.testing.assert_close(sb[name], sa[name], rtol=0, atol=1e-6, msg=name)
    assert [e.hardness for e in full.buffer.entries] == pytest.approx([e.hardness for e in resumed.buffer.entries])

    def losses(trainer):
        return [
            (log["step"], log["loss"], log["unigame/adversarial_loss"])
            for log in trainer.state.log_history
            if "loss" in log and log["step"] > 2
        ]

    assert len(losses(full)) == 2
    for (s1, l1, a1), (s2, l2, a2) in zip(losses(full), losses(resumed)):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-6) and a1 == pytest.approx(a2, abs=1e-6)


def test_final_save_holds_lora_perturber_and_processor(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, max_steps=1, mining_interval=0)
    trainer.train()
    trainer.save_model()
    files = set(os.listdir(trainer.args.output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "perturber", "processor_config.json"} <= files


def test_nan_batch_leaves_weights_untouched(tmp_path, vqa):
    from trl_unigame import UniGameDataCollator, get_interface

    model, processor = tiny_janus(seed=0)
    interface = get_interface(model, processor)
    inner = UniGameDataCollator(interface)

    def poisoned(rows):
        batch = inner(rows)
        batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    trainer = UniGameTrainer(
        model,
        make_args(tmp_path, max_steps=2, mining_interval=0),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
        data_collator=poisoned,
    )
    lora, perturber = snapshot(trainer.model), snapshot(trainer.perturber)
    with pytest.warns(UserWarning, match="not finite"):
        trainer.train()
    assert all(torch.equal(lora[n], p) for n, p in snapshot(trainer.model).items())
    assert all(torch.equal(perturber[n], p) for n, p in snapshot(trainer.perturber).items())
    logs = [log for log in trainer.state.log_history if "unigame/skipped_understanding_steps" in log]
    assert sum(log["unigame/skipped_understanding_steps"] for log in logs) == 2
    assert sum(log["unigame/skipped_perturber_steps"] for log in logs) == 2


@pytest.mark.parametrize(
    "update, accumulation, optimizer_steps", [("mixed", 1, 3), ("separate", 1, 6), ("separate", 2, 6)]
)
def test_understanding_update_mixed_or_separate(tmp_path, vqa, update, accumulation, optimizer_steps):
    # Mining fills the buffer before the first update, so every step has a buffer batch; "separate" adds one
    # optimizer step per accumulation window, never one per micro-batch.
    trainer = make_trainer(
        tmp_path,
        vqa,
        understanding_update=update,
        max_steps=3,
        hardness_quantile=0.0,
        per_device_train_batch_size=2 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    trainer.train()
    assert all("unigame/buffer_loss" in log for log in trainer.state.log_history if "loss" in log)
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {optimizer_steps}


def test_model_trains_in_train_mode_and_generation_restores_it(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, max_steps=1)
    modes = []
    original = trainer.interface.generate_images

    def spy(*args, **kwargs):
        modes.append(trainer.interface.base_model.training)
        return original(*args, **kwargs)

    trainer.interface.generate_images = spy
    compute, per_sample = trainer._host_loss, trainer._host_loss_per_sample
    trainer._host_loss = lambda model, inputs, **kw: (
        modes.append(("loss", model.training)) or compute(model, inputs, **kw)
    )
    trainer._host_loss_per_sample = lambda model, inputs: (
        modes.append(("loss", model.training)) or per_sample(model, inputs)
    )
    trainer.train()
    assert modes[0] == ("loss", True)  # perturber step
    assert modes[1] is False  # generation in eval mode
    assert modes[2:] and all(m == ("loss", True) for m in modes[2:])  # clean and buffer losses (one pass)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(candidates_kept_per_sample=5, num_candidates=2), "candidates_kept_per_sample"),
        (dict(selection="best"), "selection"),
        (dict(hardness_quantile=1.5), "hardness_quantile"),
        (dict(perturber_eps_init=0.05), "perturber_eps_init"),
        (dict(understanding_update="both"), "understanding_update"),
    ],
)
def test_inconsistent_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_bad_datasets_are_rejected_before_training(tmp_path, vqa):
    model, processor = tiny_janus(seed=0)
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['answer'\].*'caption'"):
        UniGameTrainer(model, args, train_dataset=vqa.remove_columns("answer"), processing_class=processor)
    with pytest.raises(ValueError, match="empty"):
        UniGameTrainer(model, args, train_dataset=vqa.select([]), processing_class=processor)
    assert not os.path.exists(args.output_dir)


def test_unsupported_model_is_rejected_before_training(tmp_path, vqa, non_unified_model):
    from trl_unigame import UnsupportedModelError

    _, processor = tiny_janus(seed=0)
    with pytest.raises(UnsupportedModelError, match="janus"):
        UniGameTrainer(non_unified_model, make_args(tmp_path), train_dataset=vqa, processing_class=processor)


def test_resume_from_a_foreign_checkpoint_fails_clearly(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, max_steps=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(FileNotFoundError, match="perturber"):
        trainer._load_optimizer_and_scheduler(str(foreign))


# ----------------------------------------------------------------------------------------------- selection
def _scored():
    # source:        0     0     0     1     1     1
    hardness = torch.tensor([5.0, 1.0, 3.0, 4.0, 6.0, 0.5])
    consistency = torch.tensor([0.1, 0.5, 0.4, 0.35, 0.2, 0.1])
    source = torch.tensor([0, 0, 0, 1, 1, 1])
    return hardness, consistency, source


def test_paper_rule_requires_consistency_and_hardness():
    h, s, src = _scored()
    # quantile 0.5 of H = 3.5: hard = {0, 3, 4}; consistent (s >= 0.3) = {1, 2, 3}
    kept = select_hard_candidates(h, s, src, rule="paper", quantile=0.5, threshold=0.3, top_k=2)
    assert kept.tolist() == [3]


def test_reference_rule_keeps_hard_or_inconsistent_then_top_k():
    h, s, src = _scored()
    # hard = {0, 3, 4}; inconsistent (s <= 0.3) = {0, 4, 5} -> candidates {0, 3, 4, 5}; top-1 per source: 0 and 4
    kept = select_hard_candidates(h, s, src, rule="reference", quantile=0.5, threshold=0.3, top_k=1)
    assert kept.tolist() == [4, 0]
    kept = select_hard_candidates(h, s, src, rule="reference", quantile=0.5, threshold=0.3, top_k=2)
    assert kept.tolist() == [4, 0, 3]


def test_selection_without_consistency_uses_hardness_alone():
    h, _, src = _scored()
    kept = select_hard_candidates(h, None, src, quantile=0.5, top_k=1)
    assert kept.tolist() == [4, 0]


# ----------------------------------------------------------------------------------------------- buffer
def test_buffer_keeps_the_hardest_and_samples_by_rank():
    buffer = HardSampleBuffer(capacity=3, temperature=1.0, seed=0)
    image = torch.zeros(3, 4, 4)
    for h in [1.0, 5.0, 3.0, 0.5, 4.0]:
        buffer.push(image, {"question": f"q{h}", "answer": "a"}, h)
    assert [e.hardness for e in buffer.entries] == [5.0, 4.0, 3.0]
    probabilities = buffer.probabilities()
    assert probabilities[0] > probabilities[1] > probabilities[2]
    torch.testing.assert_close(probabilities, torch.softmax(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 0))
    counts = torch.zeros(3)
    for _ in range(300):
        drawn = buffer.sample(1)[0]
        counts[[e.hardness for e in buffer.entries].index(drawn.hardness)] += 1
    assert counts[0] > counts[1] > counts[2]
    drawn = buffer.sample(5)
    assert len(drawn) == 3 and len({d.hardness for d in drawn}) == 3  # without replacement


def test_buffer_pop_and_state_round_trip():
    buffer = HardSampleBuffer(capacity=4, pop=True, seed=3)
    for h in range(4):
        buffer.push(torch.rand(3, 2, 2), {"question": str(h), "answer": "x"}, float(h))
    state = buffer.state_dict()
    clone = HardSampleBuffer()
    clone.load_state_dict(state)
    a, b = buffer.sample(2), clone.sample(2)
    assert [e.hardness for e in a] == [e.hardness for e in b]
    assert len(buffer) == 2 and len(clone) == 2
    assert all(torch.equal(x.image, y.image) for x, y in zip(buffer.entries, clone.entries))


def test_evaluate_reports_the_clean_understanding_loss(tmp_path, vqa, vqa_inputs):
    trainer = make_trainer(tmp_path, vqa, max_steps=1, mining_interval=0)
    trainer.eval_dataset = vqa.select(range(4))
    metrics = trainer.evaluate()
    from trl_unigame import get_interface

    interface = get_interface(trainer.model, trainer.processing_class)
    inputs = vqa_inputs(interface, 4)
    trainer.model.eval()
    with torch.no_grad():
        expected = interface.understanding_loss(trainer.model, inputs).mean().item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert not any(key.startswith("unigame/") for key in metrics)


def test_trained_model_is_clean_outside_the_game(tmp_path, vqa, vqa_inputs):
    from trl_unigame import get_interface

    trainer = make_trainer(tmp_path, vqa, max_steps=1, perturber_eps_init=0.015)
    trainer.train()
    interface = get_interface(trainer.model, trainer.processing_class)
    inputs = vqa_inputs(interface, 3)
    trainer.model.eval()
    with torch.no_grad():
        default = interface.understanding_loss(trainer.model, inputs)
        with trainer.perturber.active():
            perturbed = interface.understanding_loss(trainer.model, inputs)
        trainer.perturber.detach()
        clean = interface.understanding_loss(trainer.model, inputs)
    assert torch.equal(default, clean)
    assert not torch.equal(perturbed, clean)


# ------------------------------------------------------------------------------------------- reliability
def test_non_finite_perturber_step_leaves_perturber_and_its_optimizer_untouched(tmp_path, vqa):
    from transformers import TrainerCallback

    from trl_unigame import UniGameDataCollator, get_interface

    model, processor = tiny_janus(seed=0)
    inner = UniGameDataCollator(get_interface(model, processor))
    calls = []

    def poisoned_after_two(rows):  # batches 3 and 4 are not finite
        calls.append(1)
        batch = inner(rows)
        if len(calls) > 2:
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    class AtStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.perturber = snapshot(trainer.perturber)
                self.optimizer = copy.deepcopy(trainer.perturber_optimizer.state_dict())

    at_two = AtStepTwo()
    trainer = UniGameTrainer(
        model,
        make_args(tmp_path, max_steps=4, mining_interval=0),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
        data_collator=poisoned_after_two,
        callbacks=[at_two],
    )
    with pytest.warns(UserWarning, match="not finite"):
        trainer.train()
    state = trainer.perturber_optimizer.state_dict()
    moments = [s["exp_avg"] for s in at_two.optimizer["state"].values()]
    assert any(m.abs().sum() > 0 for m in moments)  # momentum that a zero-gradient step would have applied
    assert all(torch.equal(at_two.perturber[n], p) for n, p in snapshot(trainer.perturber).items())
    for index, saved in at_two.optimizer["state"].items():
        assert float(state["state"][index]["step"]) == float(saved["step"]) == 2.0
        assert torch.equal(state["state"][index]["exp_avg"], saved["exp_avg"])
        assert torch.equal(state["state"][index]["exp_avg_sq"], saved["exp_avg_sq"])


@pytest.mark.parametrize("update", ["mixed", "separate"])
def test_a_drawn_entry_takes_the_hardness_of_the_current_model(tmp_path, vqa, update):
    from trl_unigame import get_interface
    from trl_unigame.interfaces import to_pil_images
    from trl_unigame.selection import hardness

    trainer = make_trainer(
        tmp_path,
        vqa,
        lora_dropout=0.0,
        max_steps=1,
        mining_interval=0,
        buffer_batch_size=1,
        understanding_update=update,
        consistency_threshold=0.3,
        consistency_weight=0.2,
    )
    row = vqa[0]
    image = torch.from_numpy(__import__("numpy").array(row["image"].convert("RGB"))).permute(2, 0, 1)
    texts = {"question": row["question"], "answer": row["answer"], "prompt": row["caption"]}
    trainer.buffer.push(image, texts, 100.0, consistency=0.1)
    entry = trainer.buffer.entries[0]
    hard_row = trainer._hard_sample_row(entry.row, to_pil_images(entry.image.unsqueeze(0))[0])
    batch = trainer.data_collator([hard_row])
    batch.pop(ROWS_KEY)
    interface = get_interface(trainer.model, trainer.processing_class)
    trainer.model.train()
    with torch.no_grad():
        ce = interface.understanding_loss(trainer.model, trainer._prepare_inputs(batch)).float().cpu()
    if update == "separate":  # drawn after the clean step: the model it meets has already moved
        expected = None
    else:
        expected = hardness(ce, torch.tensor([0.1]), 0.2, 0.3).item()
    trainer.train()
    assert trainer.buffer.entries[0] is entry
    assert entry.hardness < 50  # no longer the hardness it was pushed with
    assert entry.consistency == 0.1  # its consistency term is kept
    if expected is not None:
        assert entry.hardness == pytest.approx(expected, rel=1e-5)
    else:
        assert entry.hardness == pytest.approx(hardness(ce, torch.tensor([0.1]), 0.2, 0.3).item(), rel=0.2)


def test_buffer_rescore_reranks_and_ignores_entries_no_longer_held():
    buffer = HardSampleBuffer(capacity=3, seed=0)
    for h in (3.0, 2.0, 1.0):
        buffer.push(torch.zeros(3, 2, 2), {"question": str(h), "answer": "a"}, h)
    hardest, middle, easiest = buffer.entries
    gone = copy.copy(middle)
    buffer.rescore([hardest, gone, easiest], [0.5, 9.0, float("nan")])
    assert [e.row["question"] for e in buffer.entries] == ["2.0", "1.0", "3.0"]
    assert [e.hardness for e in buffer.entries] == [2.0, 1.0, 0.5]


def test_mining_that_keeps_nothing_warns_once_and_is_logged(tmp_path, vqa):
    never_consistent = lambda images, texts: torch.zeros(len(texts))  # noqa: E731
    trainer = make_trainer(tmp_path, vqa, scorer=never_consistent, consistency_threshold=0.3, max_steps=7)
    with pytest.warns(UserWarning, match=r"(?s)last 5 mining rounds kept no candidate.*consistency_threshold") as seen:
        trainer.train()
    assert sum("kept no candidate" in str(w.message) for w in seen) == 1
    rounds = [log["unigame/empty_mining_rounds"] for log in trainer.state.log_history if "loss" in log]
    assert rounds[-1] == 7 and len(trainer.buffer) == 0


def test_skipped_perturber_pass_when_adversarial_weight_is_zero(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, adversarial_weight=0.0, max_steps=2, mining_interval=0)
    perturber = snapshot(trainer.perturber)
    trainer.train()
    assert all(torch.equal(perturber[n], p) for n, p in snapshot(trainer.perturber).items())
    assert not any("unigame/adversarial_loss" in log for log in trainer.state.log_history)


def test_rows_with_a_missing_image_are_named_before_training(tmp_path, vqa):
    from datasets import Dataset

    model, processor = tiny_janus(seed=0)
    rows = vqa.to_list()
    rows[5]["image"] = None
    broken = Dataset.from_list(rows, features=vqa.features)
    with pytest.raises(ValueError, match=r"train_dataset` row 5: The `image` value is None"):
        UniGameTrainer(model, make_args(tmp_path), train_dataset=broken, processing_class=processor)
    assert not os.path.exists(tmp_path / "out")


def test_the_collator_names_a_bad_row_that_slips_through(vqa, janus):
    from trl_unigame import UniGameDataCollator, get_interface

    collator = UniGameDataCollator(get_interface(*janus))
    rows = vqa.select(range(2)).to_list()
    rows[1]["image"] = None
    with pytest.raises(ValueError, match=r"Row 1 of the batch .*image"):
        collator(rows)


def test_numeric_answers_and_list_captions_become_text(tmp_path, vqa):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    rows = vqa.select(range(8)).to_dict()
    numeric = Dataset.from_dict(
        {
            "image": rows["image"],
            "question": list(range(8)),
            "answer": [float(i) for i in range(8)],
            "caption": [[c, "another caption"] for c in rows["caption"]],
        },
        features=Features(
            {
                "image": ImageFeature(),
                "question": Value("int64"),
                "answer": Value("float64"),
                "caption": Sequence(Value("string")),
            }
        ),
    )
    trainer = make_trainer(tmp_path, numeric, max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    described = batch[ROWS_KEY]
    assert all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in described)
    assert {r["prompt"] for r in described} <= set(rows["caption"])
    trainer.train()


def test_an_unreachable_consistency_model_fails_before_the_model_is_touched(tmp_path, vqa):
    from peft import PeftModel

    model, processor = tiny_janus(seed=0)
    args = make_args(tmp_path, consistency_model="openai/clip-vit-base-patch16")
    with pytest.raises(OSError, match=r"(?s)consistency_model.*local folder.*consistency_model=None"):
        UniGameTrainer(
            model, args, train_dataset=vqa, processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8)
        )
    assert not isinstance(model, PeftModel) and not any("lora_" in n for n, _ in model.named_parameters())
    assert not os.path.exists(args.output_dir)


@pytest.mark.parametrize("missing", ["perturber_optimizer.pt", "unigame_buffer_rank0.safetensors"])
def test_resume_refuses_a_checkpoint_without_the_game_state(tmp_path, vqa, missing):
    overrides = dict(max_steps=2, save_strategy="steps", save_steps=2, mining_interval=0)
    trainer = make_trainer(tmp_path / "first", vqa, **overrides)
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    os.remove(os.path.join(checkpoint, missing))
    resumed = make_trainer(tmp_path / "again", vqa, **dict(overrides, max_steps=4))
    with pytest.raises(FileNotFoundError, match=rf"lacks the game's state \({missing}\)"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert sorted(os.listdir(trainer.args.output_dir)) == ["checkpoint-2"]


def test_separate_update_steps_on_the_clean_batch_first_then_on_the_buffer(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, understanding_update="separate", max_steps=2, hardness_quantile=0.0)
    events = []
    host_loss, buffer_loss = trainer._host_loss, trainer.buffer_pass.loss
    trainer._host_loss = lambda model, inputs, **kw: events.append("loss") or host_loss(model, inputs, **kw)
    trainer.buffer_pass.loss = lambda *args: events.append("buffer") or buffer_loss(*args)
    trainer.create_optimizer()
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **kw: events.append("step") or step(*a, **kw)
    trainer.train()
    # per optimizer step: the perturber's loss, the clean loss, the clean step, the buffer's loss, the buffer step
    one_step = ["loss", "loss", "step", "buffer", "step"]
    assert events == one_step * 2


def test_suggested_threshold_is_a_quantile_of_real_pair_scores(vqa, clip_scorer):
    from trl_unigame.consistency import suggest_consistency_threshold

    scores = clip_scorer(vqa["image"], vqa["caption"])
    tau = suggest_consistency_threshold(clip_scorer, vqa, quantile=0.25)
    assert tau == pytest.approx(float(torch.quantile(scores, 0.25)), abs=1e-6)
    assert (scores >= tau).float().mean() >= 0.75


def test_perturbed_weight_trains_on_the_perturbed_batch_without_feeding_the_perturber(tmp_path, vqa):
    runs = {}
    for weight in (0.0, 0.5):
        trainer = make_trainer(
            tmp_path / str(weight),
            vqa,
            lora_dropout=0.0,
            max_steps=2,
            mining_interval=0,
            buffer_weight=0.0,
            perturbed_weight=weight,
            perturber_eps_max=1.0,
            perturber_eps_init=0.5,
        )
        trainer.train()
        runs[weight] = trainer
    logs = [log for log in runs[0.5].state.log_history if "loss" in log]
    for log in logs:
        expected = log["unigame/clean_loss"] + 0.5 * log["unigame/perturbed_loss"]
        assert log["loss"] == pytest.approx(expected, rel=1e-4)
        assert log["unigame/perturbed_loss"] != pytest.approx(log["unigame/clean_loss"], rel=1e-6)
    assert not any("unigame/perturbed_loss" in log for log in runs[0.0].state.log_history)
    lora_plain, lora_perturbed = snapshot(runs[0.0].model), snapshot(runs[0.5].model)
    assert any(not torch.equal(lora_plain[n], lora_perturbed[n]) for n in lora_plain)
    # U's pass on the perturbed batch is a fixed input for U: its backward leaves the perturber without gradient.
    trainer = runs[0.5]
    batch = first_batch(trainer)
    batch.pop(ROWS_KEY)
    trainer.model.train()
    trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).backward()
    assert all(p.grad is None for p in trainer.perturber.parameters())
    assert all(p.requires_grad for p in trainer.perturber.parameters())
    state = [run.perturber_optimizer.state_dict()["state"] for run in runs.values()]
    assert all(float(s["step"]) == 2.0 for s in state[1].values())


def test_realized_perturbation_is_logged_and_a_bf16_model_that_rounds_it_away_warns(tmp_path, vqa):
    fp32 = make_trainer(tmp_path / "fp32", vqa, max_steps=1)
    fp32.train()
    log = next(log for log in fp32.state.log_history if "loss" in log)
    assert log["unigame/realized_delta_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert log["unigame/realized_delta_norm"] == pytest.approx(log["unigame/eps"], rel=0.05)
    assert log["unigame/generation_realized_delta_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert log["unigame/token_norm"] > 0

    model, processor = tiny_janus(seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.model.aligner.parameters():
            p.mul_(300.0)  # visual tokens of norm in the hundreds, as large projector outputs have
    trainer = UniGameTrainer(
        model,
        make_args(tmp_path / "bf16", max_steps=1, mining_interval=0),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )
    with pytest.warns(
        UserWarning,
        match=r"(?s)understanding site only part of the perturbation.*cast to bfloat16.*perturber_budget='relative'",
    ):
        trainer.train()
    log = next(log for log in trainer.state.log_history if "loss" in log)
    assert log["unigame/realized_delta_cosine"] < 0.9 and log["unigame/token_norm"] > 100


def test_buffer_age_limit_turns_entries_over_and_turnover_is_logged(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, max_steps=4, hardness_quantile=0.0, buffer_capacity=50, buffer_max_age=1)
    trainer.train()
    assert trainer.buffer.entries and all(e.step >= 2 for e in trainer.buffer.entries)  # mined at steps 2 and 3
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["unigame/buffer_entered"] == 2 for log in logs)  # one kept per sample, batch 2
    assert all(0 <= log["unigame/buffer_mean_age"] <= 1 for log in logs)
    assert all(0 < log["unigame/buffer_loss_share"] < 1 for log in logs)

    buffer = HardSampleBuffer(capacity=5)
    for step in range(4):
        buffer.push(torch.zeros(3, 2, 2), {"question": "q", "answer": "a"}, float(step), step=step)
    assert buffer.evict_older_than(2) == 2 and [e.step for e in buffer.entries] == [3, 2]
    clone = HardSampleBuffer()
    clone.load_state_dict(buffer.state_dict())
    assert [e.step for e in clone.entries] == [3, 2]


def test_clean_generation_is_checked_with_the_perturber_off(tmp_path, vqa):
    states = []

    def scorer(images, texts):
        states.append(trainer.perturber.enabled)
        return torch.full((len(texts),), 0.25)

    trainer = make_trainer(tmp_path, vqa, scorer=scorer, max_steps=4, mining_interval=0, generation_check_interval=2)
    trainer.train()
    assert states == [False, False]  # steps 0 and 2
    logs = [log for log in trainer.state.log_history if "unigame/clean_generation_consistency" in log]
    assert [log["step"] for log in logs] == [1, 3] and all(
        log["unigame/clean_generation_consistency"] == 0.25 for log in logs
    )


@pytest.mark.parametrize("eps, cosine, norm_tolerance", [(0.002, 0.999, 0.02), (0.02, 0.99, 0.15)])
def test_first_order_perturber_gradient_matches_the_exact_one_at_small_eps(tmp_path, vqa, eps, cosine, norm_tolerance):
    trainer = make_trainer(
        tmp_path, vqa, lora_dropout=0.0, perturber_eps_max=2 * eps, perturber_eps_init=eps, mining_interval=0
    )
    batch = first_batch(trainer)
    batch.pop(ROWS_KEY)
    inputs = trainer._prepare_inputs(batch)
    model, params = trainer.model, list(trainer.perturber.parameters())
    model.train()
    with trainer.perturber.active():
        exact = torch.autograd.grad(trainer._host_loss(model, inputs), params)
    with trainer.perturber.disabled(), SiteCapture(trainer.interface) as capture, capture.recording():
        trainer._host_loss(model, inputs).backward()
    tokens, gradient = capture.tokens_and_gradients()
    first_order = torch.autograd.grad((gradient * trainer.perturber.delta(tokens)).sum(), params)
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (exact, first_order)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > cosine
    torch.testing.assert_close(flat[1].norm(), flat[0].norm(), rtol=norm_tolerance, atol=0)


def test_first_order_update_trains_the_perturber_without_an_extra_pass(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, max_steps=2, mining_interval=0, perturber_update="first_order")
    calls = []
    host_loss = trainer._host_loss
    trainer._host_loss = lambda model, inputs, **kw: calls.append(1) or host_loss(model, inputs, **kw)
    perturber, lora = snapshot(trainer.perturber), snapshot(trainer.model)
    trainer.train()
    assert len(calls) == 2  # the clean pass of each step, nothing else
    assert all(not torch.equal(perturber[n], p) for n, p in snapshot(trainer.perturber).items())
    assert any(not torch.equal(lora[n], p) for n, p in snapshot(trainer.model).items())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["unigame/adversarial_gain_estimate"] > 0 for log in logs[1:])  # the ascent found a direction
    assert not any("unigame/adversarial_loss" in log for log in logs)
    assert all(p.grad is None for p in trainer.perturber.parameters())


def test_generation_loss_term_trains_the_generator_through_lora(tmp_path, vqa):
    from trl_unigame import get_interface

    trainer = make_trainer(
        tmp_path,
        vqa,
        lora_dropout=0.0,
        max_steps=8,
        mining_interval=0,
        adversarial_weight=0.0,
        buffer_weight=0.0,
        generation_loss_weight=1.0,
        learning_rate=2e-2,
    )
    head_module = trainer.model.get_base_model().model.generation_head
    with torch.no_grad():  # a random head near zero answers uniformly whatever the LLM says: give it a voice
        for p in head_module.parameters():
            p.mul_(100.0)
    rows = vqa.select(range(4))
    interface = get_interface(trainer.model, trainer.processing_class)
    images = interface.source_images(
        interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])
    )

    def generation_loss():
        with torch.no_grad():
            return interface.generation_loss(trainer.model, rows["caption"], images)

    before = generation_loss()
    head = snapshot(trainer.model.get_base_model().model.generation_head)
    trainer.train()
    assert before.shape == (4,) and generation_loss().mean() < before.mean()
    assert all(
        torch.equal(head[n], p) for n, p in snapshot(trainer.model.get_base_model().model.generation_head).items()
    )
    for log in (log for log in trainer.state.log_history if "loss" in log):
        assert log["loss"] == pytest.approx(log["unigame/clean_loss"] + log["unigame/generation_loss"], rel=1e-4)


def test_inconsistent_evaluation_and_budget_settings_are_rejected(tmp_path):
    for overrides, field in (
        (dict(eval_attack_eps=0.0), "eval_attack_eps"),
        (dict(perturber_budget="percent"), "perturber_budget"),
        (dict(perturber_update="second_order"), "perturber_update"),
        (dict(buffer_max_age=-1), "buffer_max_age"),
        (dict(buffer_max_loss_ratio=0.5, understanding_update="separate"), "buffer_max_loss_ratio"),
        (dict(generation_check_interval=-2), "generation_check_interval"),
        (dict(mining_compile=True, mining_compile_kwargs={"modes": "default"}), r"mining_compile_kwargs.*\['modes'\]"),
        (dict(mining_compile_kwargs="{mode: default}"), "mining_compile_kwargs` must be a dict or its JSON"),
    ):
        with pytest.raises(ValueError, match=field):
            make_args(tmp_path, **overrides)


def test_the_same_seed_draws_the_same_lora_whatever_ran_before(tmp_path, vqa):
    from trl_unigame.testing import save_tiny_janus

    path = save_tiny_janus(str(tmp_path / "model"), seed=0)
    adapters = []
    for noise in (1, 2):
        model, processor = tiny_janus(seed=0)
        torch.manual_seed(noise)  # whatever the process did before building the trainer
        model = type(model).from_pretrained(path)  # loading does not seed
        trainer = UniGameTrainer(
            model,
            make_args(tmp_path / str(noise), seed=7),
            train_dataset=vqa,
            processing_class=processor,
            peft_config=LoraConfig(r=4, lora_alpha=8),
        )
        adapters.append({n: p for n, p in snapshot(trainer.model).items() if "lora_A" in n})
    assert adapters[0] and all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_one_pass_update_equals_the_two_pass_update(tmp_path, vqa):
    results = {}
    for one_pass in (True, False):
        trainer = make_trainer(
            tmp_path / str(one_pass), vqa, lora_dropout=0.0, one_pass_update=one_pass, max_steps=4, mining_interval=2
        )
        forwards = []
        handle = trainer.interface.understanding_site.register_forward_hook(lambda *a, seen=forwards: seen.append(1))
        trainer.train()
        handle.remove()
        buffer_steps = sum(1 for log in trainer.state.log_history if "unigame/buffer_loss" in log)
        results[one_pass] = (snapshot(trainer.model), snapshot(trainer.perturber), len(forwards), buffer_steps)
    (lora_1, pert_1, forwards_1, buffer_steps), (lora_2, pert_2, forwards_2, _) = results[True], results[False]
    assert buffer_steps == 4  # mining precedes the update, so every step had a buffer batch: the paths differ
    assert forwards_2 - forwards_1 == buffer_steps  # one understanding forward fewer per step with a buffer batch
    for name in lora_1:
        torch.testing.assert_close(lora_1[name], lora_2[name], rtol=1e-4, atol=1e-6)
    for name in pert_1:
        torch.testing.assert_close(pert_1[name], pert_2[name], rtol=1e-4, atol=1e-6)


def test_mining_on_a_smaller_grid_fills_the_buffer_with_understanding_sized_images(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, mining_image_size=8, max_steps=1)
    trainer.train()
    assert len(trainer.buffer)
    size = trainer.interface.image_size
    assert all(tuple(e.image.shape) == (3, size, size) for e in trainer.buffer.entries)
    with pytest.raises(ValueError, match="mining_image_size=10"):
        make_trainer(tmp_path, vqa, mining_image_size=10)


def test_mining_with_a_compiled_step_fills_the_buffer_and_compiles_once(tmp_path, vqa):
    # aot_eager checks the tracing (one graph, one kept cache); CUDA-graph replay needs a GPU: tests/test_gpu.py.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    trainer = make_trainer(
        tmp_path,
        vqa,
        max_steps=2,
        mining_compile=True,
        mining_compile_kwargs='{"backend": "aot_eager", "mode": null}',  # as it comes from the command line
        scorer=lambda images, texts: torch.full((len(texts),), 0.5),
        generation_check_interval=1,
    )
    assert trainer.args.mining_compile_kwargs == {"backend": "aot_eager", "mode": None}
    trainer.train()
    assert len(trainer.buffer)
    assert len(trainer.interface._compiled_steps) == 1
    # two mining rounds, LoRA weights changed between them, a generation check of another batch size at each step:
    # the same graph and the same kept cache serve both rounds (the check runs eagerly)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(trainer.interface._generation_caches) == 1


def test_buffer_loss_ratio_cap_bounds_the_buffers_share_of_the_objective(tmp_path, vqa):
    trainer = make_trainer(tmp_path, vqa, buffer_weight=1.0, buffer_max_loss_ratio=0.25, max_steps=3)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "unigame/buffer_loss_share" in log]
    assert logs
    for log in logs:
        assert log["unigame/buffer_loss_share"] <= 0.2 + 1e-6  # r / (1 + r)
        assert log["unigame/buffer_weight"] < 1.0  # buffer and clean losses are alike here: beta 1 is lowered
    uncapped = make_trainer(tmp_path / "uncapped", vqa, buffer_weight=1.0, max_steps=3)
    uncapped.train()
    shares = [
        log["unigame/buffer_loss_share"] for log in uncapped.state.log_history if "unigame/buffer_loss_share" in log
    ]
    assert min(shares) > 0.3


def test_mining_and_the_generation_check_run_once_per_optimizer_step_under_accumulation(tmp_path, vqa):
    trainer = make_trainer(
        tmp_path,
        vqa,
        scorer=lambda images, texts: torch.full((len(texts),), 0.5),
        gradient_accumulation_steps=2,
        max_steps=2,
        mining_interval=1,
        generation_check_interval=1,
    )
    rounds, checks = [], []
    mine, check = trainer.miner.mine, trainer.miner.check_clean_generation
    trainer.miner.mine = lambda model, rows, inputs, step, *a: (
        rounds.append(step) or mine(model, rows, inputs, step, *a)
    )
    trainer.miner.check_clean_generation = lambda *a: checks.append(trainer.state.global_step) or check(*a)
    trainer.train()
    assert rounds == [0, 1] and checks == [0, 1]  # not once per micro-batch (4 of each)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["unigame/mined"] for log in logs] == [2 * 2, 2 * 2]  # one round of 2 rows x 2 candidates per step


def test_generation_check_loads_the_consistency_model_without_mining(tmp_path, vqa):
    from trl_unigame.testing import tiny_clip

    clip = str(tmp_path / "clip")
    tiny_clip(seed=0, save_dir=clip)
    trainer = make_trainer(
        tmp_path, vqa, max_steps=2, mining_interval=0, generation_check_interval=1, consistency_model=clip
    )
    assert trainer.consistency_scorer is not None
    trainer.train()
    assert all("unigame/clean_generation_consistency" in log for log in trainer.state.log_history if "loss" in log)
    with pytest.raises(ValueError, match="generation_check_interval"):
        make_trainer(tmp_path, vqa, mining_interval=0, generation_check_interval=1, consistency_model=None)


def save_images(folder, vqa):
    folder.mkdir()
    paths = []
    for index, image in enumerate(vqa["image"]):
        paths.append(str(folder / f"{index}.png"))
        image.save(paths[-1])
    return paths


def test_image_paths_in_a_string_column_are_read_as_images(tmp_path, vqa):
    from datasets import Dataset

    paths = save_images(tmp_path / "images", vqa)
    rows = Dataset.from_dict({"image": paths, "question": vqa["question"], "answer": vqa["answer"]})
    trainer = make_trainer(tmp_path, rows, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_corrupt_image_file_is_named_with_its_row_before_training(tmp_path, vqa):
    from datasets import Dataset, Image

    paths = save_images(tmp_path / "images", vqa)
    with open(paths[3], "rb") as f:
        data = f.read()
    with open(paths[3], "wb") as f:
        f.write(data[: len(data) // 2])
    model, processor = tiny_janus(seed=0)
    for cast in (False, True):  # plain paths, then the `datasets.Image()` feature (decoded on access)
        rows = Dataset.from_dict({"image": paths, "question": vqa["question"], "answer": vqa["answer"]})
        if cast:
            rows = rows.cast_column("image", Image())
        with pytest.raises(ValueError, match=r"train_dataset` row 3: The `image` file '.*3\.png' cannot be read"):
            UniGameTrainer(model, make_args(tmp_path), train_dataset=rows, processing_class=processor)
    assert not os.path.exists(tmp_path / "out")


def test_empty_questions_or_answers_warn_once_with_their_count(tmp_path, vqa):
    import warnings

    from datasets import Dataset

    rows = vqa.to_list()
    rows[2]["question"], rows[7]["answer"], rows[9]["answer"] = "", " ", ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, Dataset.from_list(rows, features=vqa.features))
    empty = [w for w in caught if "empty question or answer" in str(w.message)]
    assert len(empty) == 1 and "3 row(s)" in str(empty[0].message) and "rows 2, 7, 9" in str(empty[0].message)


def test_an_uncached_consistency_model_fails_at_once_when_the_hub_is_offline(tmp_path, vqa, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after `huggingface_hub` read it, as a script may do
    model, processor = tiny_janus(seed=0)
    args = make_args(tmp_path, consistency_model="openai/clip-vit-base-patch16")
    start = time.perf_counter()
    with pytest.raises(OSError, match=r"(?s)Hub is offline.*local folder.*consistency_model=None"):
        UniGameTrainer(model, args, train_dataset=vqa, processing_class=processor)
    assert time.perf_counter() - start < 10  # no retries


@pytest.mark.parametrize("adversarial_weight", [1.0, 0.0])
def test_one_optimizer_decays_the_perturber_and_never_its_scalars(tmp_path, vqa, clip_scorer, adversarial_weight):
    from test_generation_adversary import game_trainer

    trainer = game_trainer(
        "janus",
        tmp_path,
        vqa,
        clip_scorer,
        perturber_weight_decay=0.5,
        perturber_inputs="features_and_gradient",
        perturber_sites=["understanding", "generation"],
        adversarial_weight=adversarial_weight,
    )
    perturber = trainer.perturber
    before = snapshot(perturber)
    for optimizer in (trainer.perturber_optimizer, trainer.generation_adversary_optimizer):
        for p in perturber.parameters():
            p.grad = torch.zeros_like(p)  # no signal: whatever moves is weight decay
        optimizer.step()
    decay = 1 - 0.5 * 5e-2  # one decoupled decay step at the perturber's learning rate
    for name, p in perturber.named_parameters():
        if p.dim() < 2:  # the eps logit, the gradient gain, biases
            assert torch.equal(p, before[name]), name
        else:  # decayed once: by the understanding-site step, or by the generation-side one when the other never steps
            torch.testing.assert_close(p, before[name] * decay, msg=name)


def test_a_resumed_run_logs_the_game_metrics_of_the_uninterrupted_run(tmp_path, vqa, clip_scorer):
    # The checkpoint falls between two logs: what the game recorded since the last log (and its run of empty mining
    # rounds) resumes with it.
    overrides = dict(
        max_steps=4,
        logging_steps=2,
        save_strategy="steps",
        save_steps=3,
        buffer_capacity=4,
        hardness_quantile=0.0,
        consistency_threshold=1.0,  # every mining round keeps nothing: the empty-round counter runs on
    )
    full = make_trainer(tmp_path / "full", vqa, scorer=clip_scorer, **overrides)
    full.train()
    checkpoint = os.path.join(full.args.output_dir, "checkpoint-3")
    assert "unigame_log_state_rank0.json" in os.listdir(checkpoint)
    resumed = make_trainer(tmp_path / "resumed", vqa, scorer=clip_scorer, **overrides)
    resumed.train(resume_from_checkpoint=checkpoint)

    def game_log(trainer):
        (log,) = [log for log in trainer.state.log_history if log.get("step") == 4 and "loss" in log]
        return {key: value for key, value in log.items() if key.startswith("unigame/")}

    expected, got = game_log(full), game_log(resumed)
    assert expected["unigame/empty_mining_rounds"] == 3.5  # rounds 3 and 4 of a run of empty rounds
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_load_best_model_at_end_keeps_the_best_adapter_and_its_perturber_paired(tmp_path, vqa):
    model, processor = tiny_janus(seed=0)
    args = make_args(
        tmp_path,
        max_steps=3,
        mining_interval=0,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=vqa,
        eval_dataset=vqa.select(range(4)),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")  # the highest eval loss: not the last step's
    from safetensors.torch import load_file

    perturber = load_file(os.path.join(best, "perturber", "model.safetensors"))
    last = load_file(os.path.join(trainer.args.output_dir, "checkpoint-3", "perturber", "model.safetensors"))
    assert any(not torch.equal(last[n], perturber[n]) for n in perturber)
    for name, value in trainer.perturber.state_dict().items():
        assert torch.equal(value, perturber[name]), name
    adapter = load_file(os.path.join(best, "adapter_model.safetensors"))
    weights = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert len(adapter) == len(weights)
    for name, value in adapter.items():
        assert torch.equal(weights[name.replace(".weight", ".default.weight")], value), name


def _effect_method(name):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import effect

    return dict(effect.METHODS[name])


def test_the_self_augment_baseline_keeps_every_unperturbed_drawing_and_nothing_learns_to_attack(tmp_path, vqa):
    settings = _effect_method("self-augment")
    trainer = make_trainer(tmp_path, vqa, **{**settings, "buffer_batch_size": 2, "max_steps": 3})
    perturber_before = snapshot(trainer.perturber)
    with trainer.perturber.recording() as deltas:
        trainer.train()
    logs = [log for log in trainer.state.log_history if "unigame/kept_fraction" in log]
    assert len(logs) == 3 and all(log["unigame/kept_fraction"] == 1.0 for log in logs)
    assert all(log["unigame/mined"] == 2 for log in logs)  # one drawing per row
    assert "unigame/buffer_loss" in logs[-1] and not deltas  # trained on the drawings; never perturbed
    assert all(torch.equal(perturber_before[n], p) for n, p in snapshot(trainer.perturber).items())


def test_the_fgsm_baseline_trains_on_tokens_moved_along_their_gradient(tmp_path, vqa):
    settings = _effect_method("fgsm-at")
    trainer = make_trainer(tmp_path, vqa, lora_dropout=0.0, **{**settings, "max_steps": 2})
    assert trainer.perturber.fixed_step
    with trainer.perturber.recording() as deltas:
        trainer.train()
    logs = [log for log in trainer.state.log_history if "unigame/perturbed_loss" in log]
    assert logs and all(log["unigame/perturbed_loss"] > log["unigame/clean_loss"] for log in logs)
    assert deltas and all(d.norm(dim=-1).gt(0).any() for d in deltas)
    assert "unigame/kept_fraction" not in logs[0] and "unigame/adversarial_gain_estimate" not in logs[0]
