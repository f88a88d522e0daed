import os

import pytest
import torch
from peft import LoraConfig, PeftModel

from trl_unigame import (
    Perturber,
    UniGameConfig,
    UniGameDPOConfig,
    UniGameDPOTrainer,
    UniGameSFTConfig,
    UniGameSFTTrainer,
    UniGameTrainer,
    get_interface,
)
from trl_unigame.data import ROWS_KEY
from trl_unigame.testing import tiny_janus


COMMON = dict(
    use_cpu=True,
    bf16=False,
    per_device_train_batch_size=2,
    max_steps=2,
    logging_steps=1,
    report_to=[],
    consistency_model=None,
    num_candidates=2,
    hardness_quantile=0.0,
    buffer_batch_size=2,
    save_steps=2,
    disable_tqdm=True,
    learning_rate=1e-2,
    perturber_learning_rate=1e-2,
    seed=0,
)


def conversational(vqa):
    def convert(row):
        return {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
            ],
            "images": [row["image"]],
        }

    return vqa.map(convert, remove_columns=vqa.column_names)


def preference(vqa):
    def convert(row):
        wrong = "blue" if row["answer"] != "blue" else "red"
        return {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
            "images": [row["image"]],
        }

    return vqa.map(convert, remove_columns=vqa.column_names)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def check_played(trainer, before, perturber_before, trainable="lora_"):
    after = snapshot(trainer.model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(trainable in n for n in moved)
    assert all(not torch.equal(perturber_before[n], p) for n, p in snapshot(trainer.perturber).items())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all("unigame/adversarial_loss" in log and "unigame/buffer_loss" in log for log in logs)
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    assert {"perturber", "perturber_optimizer.pt", "unigame_buffer_rank0.safetensors"} <= set(os.listdir(checkpoint))


def sft_trainer(tmp_path, vqa, **lora):
    model, processor = tiny_janus(seed=0)
    args = UniGameSFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False, **COMMON)
    return UniGameSFTTrainer(
        model,
        args=args,
        train_dataset=conversational(vqa),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, **lora),
    )


def test_sft_conversational_vision_trains_the_game(tmp_path, vqa):
    trainer = sft_trainer(tmp_path, vqa)
    before, perturber_before = snapshot(trainer.model), snapshot(trainer.perturber)
    trainer.train()
    check_played(trainer, before, perturber_before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "mean_token_accuracy" in logs[0]  # SFT's own metrics are kept
    # The SFT loss that is reported is clean + beta * buffer.
    for log in logs:
        assert log["loss"] == pytest.approx(log["unigame/clean_loss"] + 0.5 * log["unigame/buffer_loss"], rel=1e-4)
    entry = trainer.buffer.entries[0]
    assert entry.row["messages"][0]["role"] == "user" and entry.row["question"] in vqa["question"]
    assert "unigame" in (tmp_path / "README.md").read_text()


def test_sft_metrics_count_the_clean_pass_only(tmp_path, vqa):
    def tokens_and_accuracy(trainer):
        trainer.train()
        logs = [log for log in trainer.state.log_history if "loss" in log]
        return [log["num_tokens"] for log in logs], [log["mean_token_accuracy"] for log in logs]

    game = sft_trainer(tmp_path / "game", vqa, lora_dropout=0.0)
    plain = sft_trainer(tmp_path / "plain", vqa, lora_dropout=0.0)
    plain.args.adversarial_weight, plain.args.mining_interval, plain.args.buffer_weight = 0.0, 0, 0.0
    game_tokens, game_accuracy = tokens_and_accuracy(game)
    plain_tokens, plain_accuracy = tokens_and_accuracy(plain)
    assert len(game.buffer) > 0  # the buffer pass ran
    assert game_tokens == plain_tokens
    assert game_accuracy[0] == pytest.approx(plain_accuracy[0])  # the first step's model is the same in both


def test_sft_evaluation_with_compute_metrics_gets_the_host_outputs(tmp_path, vqa):
    model, processor = tiny_janus(seed=0)
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"logit_rows": float(prediction.predictions.shape[0])}

    args = UniGameSFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False, **{**COMMON, "max_steps": 1})
    trainer = UniGameSFTTrainer(
        model,
        args=args,
        train_dataset=conversational(vqa),
        eval_dataset=conversational(vqa.select(range(4))),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_logit_rows"] == 4 and seen and seen[0][-1] == len(processor.tokenizer)


def test_sft_adversarial_loss_is_sft_loss_with_the_perturbation(tmp_path, vqa):
    trainer = sft_trainer(tmp_path, vqa, lora_dropout=0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    rows = batch.pop(ROWS_KEY)
    assert [r["answer"] for r in rows] and all(r["question"] for r in rows)
    inputs = trainer._prepare_inputs(batch)
    with trainer.perturber.disabled():
        clean = trainer._host_loss(trainer.model, inputs).item()
    with torch.no_grad():
        trainer.perturber.rho.fill_(10.0)  # eps near eps_max
    with trainer.perturber.active():
        perturbed = trainer._host_loss(trainer.model, inputs).item()
    assert perturbed != clean


@pytest.mark.parametrize("explicit_ref", [False, True])
def test_dpo_with_images_trains_the_game(tmp_path, vqa, explicit_ref):
    model, processor = tiny_janus(seed=0)
    ref_model = tiny_janus(seed=0)[0] if explicit_ref else None
    args = UniGameDPOConfig(output_dir=str(tmp_path), **COMMON)
    peft_config = LoraConfig(r=4, lora_alpha=8)
    trainer = UniGameDPOTrainer(
        model,
        ref_model=ref_model,
        args=args,
        train_dataset=preference(vqa),
        processing_class=processor,
        peft_config=peft_config,
    )
    before, perturber_before = snapshot(trainer.model), snapshot(trainer.perturber)
    trainer.train()
    check_played(trainer, before, perturber_before)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert "rewards/margins" in logs[0]  # DPO's own metrics are kept
    assert trainer.buffer.entries[0].row["pair"]["rejected"][0]["role"] == "assistant"
    if explicit_ref:
        assert all(p.grad is None for p in trainer.ref_model.parameters())


@pytest.mark.parametrize("host", ["sft", "dpo"])
def test_stacked_hosts_train_the_generation_loss_on_anchors(tmp_path, vqa, host):
    model, processor = tiny_janus(seed=0)
    anchors = dict(generation_loss_weight=1.0, generation_loss_targets="anchors", generation_anchors=3)
    lora = LoraConfig(r=4, lora_alpha=8)
    if host == "sft":
        args = UniGameSFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False, **COMMON, **anchors)
        trainer = UniGameSFTTrainer(
            model, args=args, train_dataset=conversational(vqa), processing_class=processor, peft_config=lora
        )
    else:
        args = UniGameDPOConfig(output_dir=str(tmp_path), **COMMON, **anchors)
        trainer = UniGameDPOTrainer(
            model, args=args, train_dataset=preference(vqa), processing_class=processor, peft_config=lora
        )
    trainer.train()
    # the rows' prompts, as the host describes its rows
    prompts = {trainer._describe_row(row)["prompt"] for row in trainer.train_dataset}
    assert len(trainer.anchors) == 3 and set(trainer.anchors.prompts) <= prompts
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(log["unigame/generation_loss"] > 0 for log in logs)


@pytest.mark.parametrize("update, inputs", [("first_order", "features"), ("exact", "features_and_gradient")])
def test_dpo_reference_pass_does_not_stand_in_for_the_policys_tokens(tmp_path, vqa, update, inputs):
    import warnings

    # Without a ref_model, DPO runs its reference forward (adapter off, no gradients) through the same site.
    model, processor = tiny_janus(seed=0)
    args = UniGameDPOConfig(
        output_dir=str(tmp_path), perturber_update=update, perturber_inputs=inputs, perturbed_weight=0.5, **COMMON
    )
    trainer = UniGameDPOTrainer(
        model,
        args=args,
        train_dataset=preference(vqa),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8),
    )
    perturber_before = snapshot(trainer.perturber)
    given = []
    gradients = trainer.perturber.gradients
    trainer.perturber.gradients = lambda **kw: given.append(kw["understanding"]) or gradients(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "update of this step is skipped" in str(w.message)]
    assert all(log["unigame/skipped_perturber_steps"] == 0 for log in trainer.state.log_history if "loss" in log)
    assert all(not torch.equal(perturber_before[n], p) for n, p in snapshot(trainer.perturber).items())
    if inputs == "features_and_gradient":  # the exact step and the perturbed pass each read the policy's gradient
        assert given and all(g is not None and g.abs().sum() > 0 for g in given)


def test_stacked_trainers_reject_datasets_without_images(tmp_path, vqa):
    model, processor = tiny_janus(seed=0)
    data = conversational(vqa).remove_columns("images")
    args = UniGameSFTConfig(output_dir=str(tmp_path), gradient_checkpointing=False, **COMMON)
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['images'\]"):
        UniGameSFTTrainer(model, args=args, train_dataset=data, processing_class=processor)


def test_sequential_sft_then_unigame_then_dpo(tmp_path, vqa):
    from trl import SFTConfig, SFTTrainer

    # 1. plain TRL SFT with LoRA on the LLM
    model, processor = tiny_janus(seed=0)
    interface = get_interface(model)
    sft_args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    sft = SFTTrainer(
        model,
        args=sft_args,
        train_dataset=conversational(vqa),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=interface.lora_target_modules),
    )
    sft.train()
    sft.save_model()

    # 2. UniGame continues the SFT adapter
    base, processor = tiny_janus(seed=0)
    model = PeftModel.from_pretrained(base, tmp_path / "sft", is_trainable=True)
    sft_lora = snapshot(model)
    args = UniGameConfig(output_dir=str(tmp_path / "unigame"), **{k: v for k, v in COMMON.items() if k != "bf16"})
    game = UniGameTrainer(model, args, train_dataset=vqa, processing_class=processor)
    game.train()
    game.save_model()
    moved = [n for n, p in snapshot(game.model).items() if not torch.equal(sft_lora[n], p)]
    assert moved and all("lora_" in n for n in moved)

    # 3. DPO starts from the UniGame result: LoRA + perturber folder
    base, processor = tiny_janus(seed=0)
    model = PeftModel.from_pretrained(base, tmp_path / "unigame", is_trainable=True)
    perturber = Perturber.from_pretrained(tmp_path / "unigame", subfolder="perturber")
    for a, b in zip(perturber.state_dict().values(), game.perturber.state_dict().values()):
        assert torch.equal(a, b.cpu())
    unigame_lora = snapshot(model)
    for name, value in snapshot(game.model).items():
        assert torch.equal(unigame_lora[name], value)
    dpo_args = UniGameDPOConfig(output_dir=str(tmp_path / "dpo"), **COMMON)
    dpo = UniGameDPOTrainer(
        model, args=dpo_args, train_dataset=preference(vqa), processing_class=processor, perturber=perturber
    )
    assert dpo.perturber is perturber
    dpo.train()
    assert any(not torch.equal(unigame_lora[n], p) for n, p in snapshot(dpo.model).items())
