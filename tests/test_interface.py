import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from trl_unigame import Perturber, UnsupportedModelError, get_interface
from trl_unigame.testing import tiny_janus_processor
from trl_unigame.unigame_trainer import prepare_understanding_player


def test_per_sample_loss_matches_manual_computation(janus, vqa, vqa_inputs):
    model, processor = janus
    interface = get_interface(model, processor)
    inputs = vqa_inputs(interface)
    losses = interface.understanding_loss(model, inputs)
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
    ).logits
    expected = []
    for i in range(logits.shape[0]):
        labels = inputs["labels"][i, 1:]
        mask = labels != -100
        expected.append(F.cross_entropy(logits[i, :-1][mask], labels[mask]))
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert losses.shape == (4,)
    assert losses.std() > 0, "each sample must get its own loss, not the batch mean"


def test_labels_cover_only_the_answer_and_eos(janus, vqa, vqa_inputs):
    model, processor = janus
    interface = get_interface(model, processor)
    inputs = vqa_inputs(interface)
    tokenizer = processor.tokenizer
    for i, answer in enumerate(vqa["answer"][:4]):
        labelled = inputs["labels"][i][inputs["labels"][i] != -100]
        assert labelled[-1].item() == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]).strip() == answer
        image_positions = inputs["input_ids"][i] == model.config.image_token_id
        assert image_positions.sum() == interface.num_image_tokens
        assert (inputs["labels"][i][image_positions] == -100).all()
    # left padding: the padded positions are masked out of attention and labels
    pad = inputs["attention_mask"] == 0
    assert (inputs["labels"][pad] == -100).all()


@pytest.mark.parametrize("site", ["understanding", "generation"])
def test_perturbation_at_each_site_changes_output_and_gets_gradients(janus, vqa, site, vqa_inputs):
    model, processor = janus
    interface = get_interface(model, processor)
    perturber = Perturber.for_model(model, sites=[site], eps_max=0.5, eps_init=0.4).attach(model)
    if site == "understanding":
        inputs = vqa_inputs(interface)

        def run():
            return interface.understanding_loss(model, inputs).sum()
    else:
        tokens = torch.randint(0, 64, (2, 5))

        def run():
            embeds = model.prepare_embeddings_for_image_generation(tokens)
            hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
            return model.model.generation_head(hidden).logsumexp(-1).sum()

    with perturber.disabled():
        clean = run()
    perturbed = run()
    assert not torch.allclose(clean, perturbed)
    perturbed.backward()
    grads = [p.grad for p in perturber.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("use_lora", [True, False])
def test_understanding_loss_leaves_vision_and_generation_stack_without_gradient(janus, vqa, use_lora, vqa_inputs):
    model, processor = janus
    interface = get_interface(model, processor)
    peft_config = LoraConfig(r=4, lora_alpha=8) if use_lora else None
    model = prepare_understanding_player(model, interface, peft_config)
    interface = get_interface(model, processor)
    interface.understanding_loss(model, vqa_inputs(interface)).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    frozen = ("vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner", "generation_head")
    for name, grad in grads.items():
        if any(f".{part}." in name for part in frozen):
            assert grad is None, name
    trained = [n for n, g in grads.items() if g is not None]
    assert trained and all("language_model" in n or "lm_head" in n for n in trained)
    if use_lora:
        assert all("lora_" in n for n in trained)


def test_generation_shape_range_and_seed(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    prompts = ["A red circle.", "A blue square on a white background."]
    first = interface.generate_images(prompts, num_images=3, generator=torch.Generator().manual_seed(0))
    again = interface.generate_images(prompts, num_images=3, generator=torch.Generator().manual_seed(0))
    other = interface.generate_images(prompts, num_images=3, generator=torch.Generator().manual_seed(1))
    assert first.shape == (6, 3, interface.image_size, interface.image_size)
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_greedy_generation_matches_transformers_generate(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    prompts = ["A red circle.", "A green triangle on a white background."]
    ours = interface.generate_images(prompts, num_images=1, guidance_scale=3.0, temperature=0.0)
    texts = [interface._chat_prompt(p, with_image=False) for p in prompts]
    enc = processor(text=texts, generation_mode="image", return_tensors="pt", padding=True)
    tokens = model.generate(**enc, generation_mode="image", do_sample=False, guidance_scale=3.0)
    reference = ((model.decode_image_tokens(tokens).permute(0, 3, 1, 2) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_generation_with_perturbation_differs(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    perturber = Perturber.for_model(model, eps_max=2.0, eps_init=1.5).attach(model)
    prompts = ["A red circle."]
    with perturber.disabled():
        clean = interface.generate_images(prompts, num_images=2, temperature=0.0)
    perturbed = interface.generate_images(prompts, num_images=2, temperature=0.0)
    assert not torch.equal(clean, perturbed)


def test_interface_sees_through_peft(janus):
    model, processor = janus
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=get_interface(model).lora_target_modules))
    interface = get_interface(peft_model, processor)
    assert interface.base_model is model
    lora = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora and not any("vision_model" in n for n in lora)


def test_processor_round_trips_offline(tmp_path, monkeypatch, vqa):
    from transformers import JanusProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = tiny_janus_processor()
    processor.save_pretrained(tmp_path)
    loaded = JanusProcessor.from_pretrained(tmp_path)
    text = "<|User|>: <image_placeholder>\nWhat color is the circle?\n\n<|Assistant|>:"
    a = processor(text=[text], images=[vqa[0]["image"]], return_tensors="pt")
    b = loaded(text=[text], images=[vqa[0]["image"]], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert loaded.chat_template == processor.chat_template


def test_unsupported_model_gets_a_clear_error(non_unified_model):
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*janus.*register_interface"):
        get_interface(non_unified_model)
    with pytest.raises(UnsupportedModelError):
        Perturber.for_model(non_unified_model)


def test_concatenated_batches_keep_each_rows_loss(janus, vqa):
    model, processor = janus
    interface = get_interface(model, processor)
    rows = vqa.select(range(5))
    first = interface.build_understanding_inputs(rows["image"][:2], rows["question"][:2], rows["answer"][:2])
    long_questions = [q + " Look closely at the picture and answer." for q in rows["question"][2:]]
    second = interface.build_understanding_inputs(rows["image"][2:], long_questions, rows["answer"][2:])
    assert first["input_ids"].shape[1] < second["input_ids"].shape[1]  # the first batch gets extra left padding
    merged = interface.concatenate_inputs(first, second)
    assert merged["input_ids"].shape == (5, second["input_ids"].shape[1])
    with torch.no_grad():
        separate = torch.cat([interface.understanding_loss(model, first), interface.understanding_loss(model, second)])
        together = interface.understanding_loss(model, merged)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)
    unlike = dict(second, extra=torch.zeros(3))
    assert interface.concatenate_inputs(first, unlike) is None  # different keys: two passes


def test_generation_on_a_smaller_grid_comes_back_at_the_understanding_size(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    steps = []
    handle = model.model.generation_head.register_forward_hook(lambda *a: steps.append(1))
    native = interface.generate_images(["a red square"], num_images=2, temperature=0.0)
    native_steps, steps[:] = len(steps), []
    small = interface.generate_images(["a red square"], num_images=2, temperature=0.0, image_size=8)
    handle.remove()
    assert native_steps == interface.num_image_tokens == 16
    assert len(steps) == 4  # a 2 x 2 grid of tokens: 8 px at 4 px per token
    assert small.shape == native.shape == (2, 3, interface.image_size, interface.image_size)
    assert 0 <= small.min() and small.max() <= 1
    assert interface.generation_grid() == 4 and interface.generation_grid(12) == 3
    for bad in (6, 20, 0):
        with pytest.raises(ValueError, match="multiple of 4 up to 16"):
            interface.generation_grid(bad)


def test_compiled_generation_step_matches_eager_and_compiles_once(janus):
    from transformers import CompileConfig

    model, processor = janus
    interface = get_interface(model, processor)
    # aot_eager traces the step as inductor would (dynamo and AOTAutograd) without generating code, so the test is fast
    compiled = CompileConfig(backend="aot_eager", mode=None)
    prompts = [["A red circle.", "A green triangle on a white background."], ["A blue square.", "A dot."]]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for batch in prompts:  # two prompt lengths: the mask spans the rounded cache, so the shapes stay the same
        eager = interface.generate_images(batch, guidance_scale=3.0, temperature=0.0)
        ours = interface.generate_images(batch, guidance_scale=3.0, temperature=0.0, compile_config=compiled)
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(interface._compiled_steps) == 1


def test_compiled_generation_keeps_its_cache_and_adds_a_graph_per_new_shape(janus):
    from transformers import CompileConfig

    model, processor = janus
    interface = get_interface(model, processor)
    compiled = CompileConfig(backend="aot_eager", mode=None)
    prompts = ["A red circle.", "A green triangle on a white background."]
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()

    def run(batch, num_images):
        return interface.generate_images(
            batch, num_images=num_images, guidance_scale=3.0, temperature=0.0, compile_config=compiled
        )

    def cache_for(rows):
        return next(cache for key, (_, cache) in interface._generation_caches.items() if key[1] == rows)

    first = run(prompts, 3)
    cache = cache_for(2 * 2 * 3)  # guidance doubles the batch
    prompt_length = interface._generation_prompt(prompts)[0].shape[1]
    assert int(cache.get_seq_length()) == prompt_length + interface.num_image_tokens - 1  # the last token is not fed
    again = run(prompts, 3)
    assert cache_for(12) is cache, "a round with the same shapes must reuse the cache, not build one"
    assert torch.equal(again, first), "the reset cache must give what a fresh one gives"
    assert counters["stats"]["unique_graphs"] == 1

    run(prompts, 1)  # the trainer's generation check: another batch, one more graph (dynamic in the batch)
    assert counters["stats"]["unique_graphs"] == 2
    run(prompts, 2)  # which serves every later batch size
    assert counters["stats"]["unique_graphs"] == 2
    assert cache_for(12) is cache and len(interface._generation_caches) == 3  # one cache per batch size

    long = ["A red circle and a blue square " * 6, "A dot."]
    assert interface._generation_prompt(long)[0].shape[1] + interface.num_image_tokens > 64
    run(long, 3)  # past the 64-token bucket: one more graph, and a longer cache replaces the batch's cache
    assert counters["stats"]["unique_graphs"] == 3
    assert cache_for(12) is not cache and cache_for(12).get_max_length() == 128
    assert not counters["graph_break"]
    interface.clear_generation_caches()
    assert not interface._generation_caches
