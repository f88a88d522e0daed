"""Generation anchors (`generation_loss_targets="anchors"`): the generation loss on the model's own drawings, drawn
with its adapter off."""

import pytest
import torch
from peft import LoraConfig
from test_trainer import make_args

from trl_unigame import UniGameTrainer, get_interface
from trl_unigame.game.anchors import ANCHOR_SEED_OFFSET
from trl_unigame.game.mining import mining_seed
from trl_unigame.interfaces.base import to_uint8
from trl_unigame.testing import tiny_janus


def anchor_args(tmp_path, **overrides):
    """`test_trainer`'s arguments with the game off but the generation loss on anchors."""
    settings = dict(
        max_steps=4,
        learning_rate=2e-2,
        mining_interval=0,
        adversarial_weight=0.0,
        buffer_weight=0.0,
        generation_loss_weight=1.0,
        generation_loss_targets="anchors",
        generation_anchors=3,
        generation_guidance_scale=1.0,
        generation_temperature=1.0,
    )
    return make_args(tmp_path, **{**settings, **overrides})


def anchor_trainer(tmp_path, vqa, peft=True, **overrides):
    model, processor = tiny_janus(seed=0)
    with torch.no_grad():  # a random head near zero samples uniformly whatever the LLM says: give it a voice
        for p in model.model.generation_head.parameters():
            p.mul_(100.0)
    return UniGameTrainer(
        model,
        anchor_args(tmp_path, **overrides),
        train_dataset=vqa,
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0) if peft else None,
    )


def test_anchors_are_the_models_own_drawings_with_its_adapter_off_and_the_loss_trains_towards_them(tmp_path, vqa):
    trainer = anchor_trainer(tmp_path, vqa)
    draws = []
    draw = trainer.anchors.draw

    def recording_draw(model, prompts, step, process_index):
        draws.append((list(prompts), step))
        return draw(model, prompts, step, process_index)

    trainer.anchors.draw = recording_draw
    trainer.train()
    anchors = trainer.anchors
    # the prompts of the first rows, up to the capacity, in the order they came
    assert len(anchors) == 3 and len(draws) == 2
    assert set(anchors.prompts) <= set(vqa["caption"])
    assert [p for prompts, _ in draws for p in prompts] == anchors.prompts
    assert all(prompts for prompts, _ in draws)  # no call once full
    # drawn with the adapter off: the model as loaded redraws them exactly; the fine-tuned one does not
    model, interface = trainer.model, get_interface(trainer.model, trainer.processing_class)
    model.eval()

    def redraw(adapter_on: bool):
        images = []
        for prompts, step in draws:
            generator = torch.Generator().manual_seed(mining_seed(ANCHOR_SEED_OFFSET, step, 0))
            with torch.no_grad(), torch.enable_grad() if adapter_on else model.disable_adapter():
                pixels = interface.generate_images(
                    prompts, num_images=1, guidance_scale=1.0, temperature=1.0, generator=generator
                )
            images += [to_uint8(p.float()) for p in pixels]
        return images

    assert all(torch.equal(a, b) for a, b in zip(redraw(adapter_on=False), anchors.images, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(redraw(adapter_on=True), anchors.images))
    # the loss is the clean loss plus the anchors' generation loss, and training lowered the latter
    pixels = torch.stack(anchors.images).float() / 255
    with torch.no_grad():
        after = interface.generation_loss(model, anchors.prompts, pixels).mean()
        with model.disable_adapter():
            before = interface.generation_loss(model, anchors.prompts, pixels).mean()
    assert after < before
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 4
    for log in logs:
        assert log["loss"] == pytest.approx(log["unigame/clean_loss"] + log["unigame/generation_loss"], rel=1e-4)


def test_each_micro_batch_takes_anchors_at_random_seeded_by_its_step_and_place(tmp_path, vqa):
    anchors = anchor_trainer(tmp_path, vqa, generation_anchors=6).anchors
    anchors.prompts = [f"p{i}" for i in range(6)]
    anchors.images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(6)]
    window = [anchors.batch(4, step=7, process_index=0) for _ in range(3)]
    for prompts, pixels in window:  # four distinct anchors, each with its own image
        assert len(set(prompts)) == 4 and pixels.shape == (4, 3, 4, 4)
        assert [round(float(p[0, 0, 0]) * 255) for p in pixels] == [int(p[1:]) for p in prompts]
    assert len({tuple(prompts) for prompts, _ in window}) > 1  # the micro-batches of one step differ
    anchors.batch(4, step=8, process_index=0)
    assert anchors.batch(4, step=7, process_index=0)[0] == window[0][0]  # the step's first again: the same draw
    assert sorted(anchors.batch(10, step=9, process_index=0)[0]) == anchors.prompts  # fewer held: all of them


def test_inconsistent_anchor_settings_are_refused_before_training(tmp_path, vqa):
    for overrides, message in (
        (dict(generation_loss_weight=0.0), r"`generation_loss_weight` is 0"),
        (dict(generation_loss_targets="drawings"), r"`generation_loss_targets` must be 'batch' or 'anchors'"),
        (dict(generation_anchors=0), r"`generation_anchors` must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            anchor_args(tmp_path, **overrides)
    with pytest.raises(ValueError, match=r"has no PEFT adapter: pass a `peft_config`"):
        anchor_trainer(tmp_path, vqa, peft=False)
