"""Every combination of the options that change how one optimizer step is computed gives the same update as a
reference computed the slow, obvious way: all rows of the window in one batch, the clean pass, the buffer pass and
the generation loss each on its own, and the perturber's gradient from its own pass.

The matrix: `perturber_update` {exact, first_order} x `one_pass_update` {True, False} x family {Janus, Emu3} x host
{UniGameTrainer, UniGameSFTTrainer} x gradient accumulation {1, 2}. One window holds 4 rows (4 x 1 or 2 x 2), so the
window's update does not depend on how its rows are split into micro-batches (clean, buffer and generation losses are
means over equal micro-batches, or the host's token mean over the window). The buffer holds exactly
`buffer_batch_size` entries, so every draw takes all of them. The first-order reference is the first-order gain
`<g, delta(z)>` with `g` the gradient of the clean loss alone at the visual positions of the understanding site: the
first-order step approximates the exact one (see `test_first_order_perturber_gradient_matches_the_exact_one_at_small_eps`
in test_trainer.py), and this matrix checks it computes exactly that approximation.
"""

import pytest
import torch
from peft import LoraConfig
from test_stacking import conversational  # noqa: E402
from transformers import TrainerCallback
from trl import SFTTrainer

from trl_unigame import UniGameConfig, UniGameSFTConfig, UniGameSFTTrainer, UniGameTrainer
from trl_unigame.data import ROWS_KEY
from trl_unigame.testing import tiny_emu3, tiny_janus


BUILDERS = {"janus": tiny_janus, "emu3": tiny_emu3}
# Emu3-Chat's prompt format as a chat template, which TRL's vision collator needs (the tiny processor ships none).
EMU3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " ASSISTANT:{% else %} {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)
ROWS = 4
ADVERSARIAL_WEIGHT = 1.0
BUFFER_WEIGHT = 0.5
GENERATION_WEIGHT = 0.7


class GradientRecorder(TrainerCallback):
    """Keeps the gradients the understanding player's optimizer is about to apply, at its first step."""

    def __init__(self, model):
        self.model = model
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def build_trainer(tmp_path, vqa, family, host, perturber_update, one_pass, accumulation, inputs="features"):
    model, processor = BUILDERS[family](seed=0)
    for module in model.modules():  # dropout off (tiny Emu3 has 0.1): the reference must see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    if family == "emu3" and host == "sft":
        processor.chat_template = EMU3_CHAT_TEMPLATE
    generation_weight = GENERATION_WEIGHT if family == "janus" else 0.0  # Emu3 has no generation loss
    common = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=ROWS // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-3,
        optim="sgd",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        consistency_model=None,
        mining_interval=0,
        adversarial_weight=ADVERSARIAL_WEIGHT,
        buffer_weight=BUFFER_WEIGHT,
        buffer_batch_size=2,
        generation_loss_weight=generation_weight,
        perturber_update=perturber_update,
        one_pass_update=one_pass,
        perturber_eps_max=0.2,
        perturber_eps_init=0.1,
        perturber_inputs=inputs,
        seed=0,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    rows = vqa.select(range(ROWS))
    if host == "unigame":
        trainer = UniGameTrainer(
            model, UniGameConfig(**common), train_dataset=rows, processing_class=processor, peft_config=lora
        )
    else:
        args = UniGameSFTConfig(gradient_checkpointing=False, **common)
        trainer = UniGameSFTTrainer(
            model, args=args, train_dataset=conversational(rows), processing_class=processor, peft_config=lora
        )
    # The buffer holds exactly one draw: rows 4 and 5 of the data, as hard samples of the host's own format.
    extra = vqa.select(range(ROWS, ROWS + 2))
    source = extra if host == "unigame" else conversational(extra)
    described = trainer.data_collator([source[i] for i in range(2)])[ROWS_KEY]
    images = trainer.interface.source_images(
        trainer.interface.build_understanding_inputs(extra["image"], extra["question"], extra["answer"])
    )
    for row, image in zip(described, images):
        trainer.buffer.push(image, row, hardness=1.0)
    return trainer, rows, source


def window_inputs(trainer, host, rows):
    """The whole window's clean rows as one host batch, and the buffer's entries as another."""
    source = rows if host == "unigame" else conversational(rows)
    clean = trainer.data_collator([source[i] for i in range(ROWS)])
    prompts = [r["prompt"] for r in clean.pop(ROWS_KEY)]
    entries = trainer.buffer.entries
    from trl_unigame.interfaces import to_pil_images

    hard_rows = [trainer._hard_sample_row(e.row, to_pil_images(e.image.unsqueeze(0))[0]) for e in entries]
    buffer = trainer.data_collator(hard_rows)
    buffer.pop(ROWS_KEY)
    return trainer._prepare_inputs(clean), trainer._prepare_inputs(buffer), prompts


def host_loss(trainer, model, inputs):
    """The host's loss on a batch, computed by the host trainer class itself (not the game)."""
    if isinstance(trainer, UniGameTrainer):
        return trainer.interface.understanding_loss(model, inputs).mean()
    return SFTTrainer.compute_loss(trainer, model, dict(inputs))


class VisualPositions:
    """The understanding site's output at its visual positions, as leaves whose gradient the backward fills."""

    def __init__(self, interface):
        self.interface = interface
        self.leaves = []

    def __enter__(self):
        mask_fn = self.interface.site_mask("understanding")

        def hook(module, args, output):
            mask = mask_fn(module, args, output) if mask_fn is not None else None
            if mask is not None and not mask.any():
                return None
            leaf = output.detach().requires_grad_(True)
            self.leaves.append((leaf, mask))
            return leaf

        self.handle = self.interface.understanding_site.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def reference_gradients(trainer, host, rows, perturber_update):
    model, perturber, interface = trainer.model, trainer.perturber, trainer.interface
    model.train()
    clean, buffer, prompts = window_inputs(trainer, host, rows)
    lora = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with perturber.disabled():
        clean_loss = host_loss(trainer, model, clean)
        objective = clean_loss + BUFFER_WEIGHT * host_loss(trainer, model, buffer)
        if trainer.args.generation_loss_weight:
            images = interface.source_images(clean)
            objective = objective + GENERATION_WEIGHT * interface.generation_loss(model, prompts, images).mean()
    understanding = dict(zip(names, torch.autograd.grad(objective, lora)))

    params = list(perturber.parameters())
    # U's gradient at the clean visual tokens: what the first-order step uses, what a gradient-reading perturber reads
    with perturber.disabled(), VisualPositions(interface) as site:
        loss = host_loss(trainer, model, clean)
    gradients = torch.autograd.grad(loss, [leaf for leaf, _ in site.leaves])
    if perturber_update == "exact":
        (full,) = gradients
        with perturber.active(), perturber.gradients(understanding=full if perturber.sees_gradient else None):
            adversarial = host_loss(trainer, model, clean)
    else:
        adversarial = 0.0
        for (leaf, mask), gradient in zip(site.leaves, gradients):
            tokens = leaf.detach() if mask is None else leaf.detach()[mask]
            gradient = gradient if mask is None else gradient[mask]
            read = gradient if perturber.sees_gradient else None
            adversarial = adversarial + (gradient * perturber.delta(tokens, "understanding", read)).sum()
    adversary = torch.autograd.grad(-ADVERSARIAL_WEIGHT * adversarial, params, allow_unused=True)
    return understanding, dict(zip([n for n, _ in perturber.named_parameters()], adversary)), float(clean_loss)


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("host", ["unigame", "sft"])
@pytest.mark.parametrize("family", ["janus", "emu3"])
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("perturber_update", ["exact", "first_order"])
def test_one_step_equals_the_slow_reference(tmp_path, vqa, perturber_update, one_pass, family, host, accumulation):
    trainer, rows, _ = build_trainer(tmp_path, vqa, family, host, perturber_update, one_pass, accumulation)
    check_one_step(trainer, rows, host, perturber_update)


@pytest.mark.parametrize("family", ["janus", "emu3"])
@pytest.mark.parametrize("perturber_update", ["exact", "first_order"])
def test_a_gradient_reading_perturber_step_equals_the_slow_reference(tmp_path, vqa, perturber_update, family):
    # one pass and accumulation: the clean rows' gradient is cut from a merged batch, once per micro-batch
    args = (perturber_update, True, 2, "features_and_gradient")
    trainer, rows, _ = build_trainer(tmp_path, vqa, family, "unigame", *args)
    check_one_step(trainer, rows, "unigame", perturber_update)


def check_one_step(trainer, rows, host, perturber_update):
    understanding, adversary, clean_loss = reference_gradients(trainer, host, rows, perturber_update)
    assert all(p.grad is None for p in trainer.model.parameters())

    recorder = GradientRecorder(trainer.model)
    trainer.add_callback(recorder)
    perturber_gradients = {}

    def keep(optimizer, args, kwargs):
        if not perturber_gradients:
            perturber_gradients.update({n: p.grad.detach().clone() for n, p in trainer.perturber.named_parameters()})

    trainer.perturber_optimizer.register_step_pre_hook(keep)
    trainer.train()

    assert recorder.gradients is not None and perturber_gradients
    # the logged clean loss is the window's clean loss, whichever way the host normalises it
    (log,) = [log for log in trainer.state.log_history if "unigame/clean_loss" in log]
    assert log["unigame/clean_loss"] == pytest.approx(clean_loss, rel=1e-5)
    for name, expected in understanding.items():
        torch.testing.assert_close(
            recorder.gradients[name], expected, rtol=2e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
    for name, expected in adversary.items():
        expected = torch.zeros_like(perturber_gradients[name]) if expected is None else expected
        torch.testing.assert_close(
            perturber_gradients[name], expected, rtol=2e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )
