"""One matrix of game-level behaviours over every model family that has a tiny offline fixture.

Unified families (Janus, Emu3) generate, so mining applies; understanding-only VLMs (LLaVA, Qwen2-VL, Idefics3, PaliGemma) play the
embedding-space game. A new family adds its fixture to `BUILDERS` (and to `GENERATIVE` when it generates images).
"""

import warnings

import pytest
import torch
from peft import LoraConfig

from trl_unigame import Perturber, PerturberConfig, UniGameConfig, UniGameTrainer, UnsupportedModelError, get_interface
from trl_unigame.interfaces import Emu3Interface, LlavaInterface, quantization_skip_modules_for
from trl_unigame.testing import tiny_emu3, tiny_idefics3, tiny_janus, tiny_llava, tiny_paligemma, tiny_qwen2_vl
from trl_unigame.unigame_trainer import prepare_understanding_player


BUILDERS = {
    "janus": tiny_janus,
    "emu3": tiny_emu3,
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "idefics3": tiny_idefics3,
    "paligemma": tiny_paligemma,
}
FAMILIES = list(BUILDERS)
GENERATIVE = ["janus", "emu3"]
UNDERSTANDING_ONLY = [f for f in FAMILIES if f not in GENERATIVE]


def build(family):
    model, processor = BUILDERS[family](seed=0)
    return model, processor, get_interface(model, processor)


def big_perturber(model, **kwargs):
    return Perturber.for_model(model, eps_max=0.5, eps_init=0.4, **kwargs).attach(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_loss_and_labels(family, vqa, vqa_inputs):
    model, processor, interface = build(family)
    inputs = vqa_inputs(interface)
    losses = interface.understanding_loss(model, inputs)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    assert losses.std() > 0, "each sample must get its own loss, not the batch mean"
    tokenizer = processor.tokenizer
    for i, answer in enumerate(vqa["answer"][:4]):
        labelled = inputs["labels"][i][inputs["labels"][i] != -100]
        assert labelled[-1].item() == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]).strip() == answer
    assert (inputs["labels"][inputs["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_perturber_bounds_gradients_and_clean_detach(family, vqa_inputs):
    model, _, interface = build(family)
    inputs = vqa_inputs(interface)
    with torch.no_grad():
        clean = interface.understanding_loss(model, inputs)
    perturber = big_perturber(model)
    with perturber.recording() as deltas:
        perturbed = interface.understanding_loss(model, inputs)
    assert not torch.allclose(clean, perturbed)
    norms = torch.cat([d.detach().norm(dim=-1).flatten() for d in deltas])
    assert norms.numel() > 0 and (norms <= perturber.config.eps_max + 1e-5).all()
    torch.testing.assert_close(norms, torch.full_like(norms, perturber.eps), rtol=1e-4, atol=1e-5)
    perturbed.sum().backward()
    assert sum(p.grad.abs().sum() for p in perturber.parameters()) > 0
    perturber.detach()
    with torch.no_grad():
        assert torch.equal(interface.understanding_loss(model, inputs), clean)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturber_saves_and_loads(family, tmp_path, vqa_inputs):
    model, _, interface = build(family)
    inputs = vqa_inputs(interface, 2)
    perturber = big_perturber(model)
    with torch.no_grad():
        expected = interface.understanding_loss(model, inputs)
    perturber.save_pretrained(tmp_path / "perturber")
    perturber.detach()
    loaded = Perturber.from_pretrained(tmp_path / "perturber").attach(model)
    assert loaded.config.sites == perturber.config.sites
    with torch.no_grad():
        torch.testing.assert_close(interface.understanding_loss(model, inputs), expected)


@pytest.mark.parametrize("family", GENERATIVE)
def test_seeded_generation_is_reproducible(family):
    model, _, interface = build(family)
    prompts = ["A red circle.", "A blue square on a white background."]
    first = interface.generate_images(prompts, num_images=2, generator=torch.Generator().manual_seed(0))
    again = interface.generate_images(prompts, num_images=2, generator=torch.Generator().manual_seed(0))
    other = interface.generate_images(prompts, num_images=2, generator=torch.Generator().manual_seed(1))
    assert first.shape[:2] == (4, 3) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    # generated candidates go straight back into the understanding path, as mining does
    inputs = interface.build_understanding_inputs(first, ["What color is the circle?"] * 4, ["red"] * 4)
    assert interface.understanding_loss(model, inputs).shape == (4,)


@pytest.mark.parametrize("family", UNDERSTANDING_ONLY)
def test_understanding_only_family_has_one_site(family):
    model, _, interface = build(family)
    assert not interface.can_generate and interface.generation_site is None
    with pytest.raises(NotImplementedError):
        interface.generate_images(["A red circle."])
    assert Perturber.for_model(model).config.sites == ["understanding"]
    with pytest.raises(ValueError, match="no such site"):
        Perturber(PerturberConfig(hidden_size=interface.hidden_size, sites=["generation"])).attach(model)


def make_trainer(family, tmp_path, vqa, **overrides):
    model, processor, _ = build(family)
    args = dict(
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
        consistency_model=None,
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return UniGameTrainer(
        model,
        UniGameConfig(**args),
        train_dataset=vqa.select(range(4)),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_runs_lora_moves_frozen_stays(family, tmp_path, vqa):
    overrides = {} if family in GENERATIVE else {"perturbed_weight": 0.5}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(family, tmp_path, vqa, **overrides)
    embedding_only = [w for w in caught if "cannot generate images" in str(w.message)]
    assert len(embedding_only) == (0 if family in GENERATIVE else 1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    perturber_before = {n: p.detach().clone() for n, p in trainer.perturber.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all("lora_" in n for n in moved), "LoRA moves, everything else stays frozen"
    assert any(not torch.equal(perturber_before[n], p) for n, p in trainer.perturber.named_parameters())
    logged = {k for log in trainer.state.log_history for k in log}
    if family in GENERATIVE:
        assert len(trainer.buffer) > 0, "mining fills the buffer"
        assert "unigame/mined" in logged
    else:
        assert len(trainer.buffer) == 0 and "unigame/mined" not in logged
        assert "unigame/perturbed_loss" in logged


@pytest.mark.parametrize("family", UNDERSTANDING_ONLY)
def test_embedding_only_game_without_perturbed_weight_says_so(family, tmp_path, vqa):
    with pytest.warns(UserWarning, match=r"78\.9 vs 79\.5.*perturbed_weight=0\.5"):
        make_trainer(family, tmp_path, vqa, perturbed_weight=0.0)


def test_emu3_perturbs_only_visual_token_embeddings(vqa_inputs):
    model, _, interface = build("emu3")
    inputs = vqa_inputs(interface, 2)
    seen = []
    hook = model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    with torch.no_grad():
        interface.understanding_loss(model, inputs)
        perturber = big_perturber(model)
        interface.understanding_loss(model, inputs)
        with perturber.disabled():
            interface.understanding_loss(model, inputs)
    hook.remove()
    clean, perturbed, disabled = seen
    changed = (perturbed - clean).norm(dim=-1) > 0
    image_positions = inputs["input_ids"] == model.config.image_token_id
    codes = image_positions & ~torch.isin(inputs["input_ids"], torch.tensor([model.vocabulary_mapping.eol_token_id]))
    # the placeholders hold visual tokens and end-of-line tokens; only visual tokens move, text never does
    assert changed.any() and not changed[~image_positions].any()
    assert int(changed.sum()) == 2 * 16, "4x4 visual tokens per image, end-of-line tokens untouched"
    assert codes.sum() >= changed.sum()
    assert torch.equal(disabled, clean)


def test_emu3_sites_act_on_their_own_path(vqa_inputs):
    model, _, interface = build("emu3")
    inputs = vqa_inputs(interface, 2)
    with torch.no_grad():
        clean_loss = interface.understanding_loss(model, inputs)
    clean_images = interface.generate_images(["A red circle."], num_images=2, temperature=0.0)
    generation_only = big_perturber(model, sites=["generation"])
    with torch.no_grad():
        assert torch.equal(interface.understanding_loss(model, inputs), clean_loss)
    assert not torch.equal(interface.generate_images(["A red circle."], num_images=2, temperature=0.0), clean_images)
    generation_only.detach()
    big_perturber(model, sites=["understanding"])
    assert torch.equal(interface.generate_images(["A red circle."], num_images=2, temperature=0.0), clean_images)


def test_emu3_greedy_generation_matches_transformers_generate():
    model, processor, interface = build("emu3")
    tokenizer = processor.tokenizer
    enc = processor(
        text=["A red circle."],
        return_for_image_generation=True,
        image_area=interface.generation_area,
        return_tensors="pt",
    )
    height, width = enc.pop("image_sizes")[0]
    visual = interface.visual_token_ids().tolist()
    eol = model.vocabulary_mapping.eol_token_id
    wrapper = tokenizer.convert_tokens_to_ids(processor.fake_token_around_image)
    closing = tokenizer.convert_tokens_to_ids([processor.eof_token, processor.image_end_token, tokenizer.eos_token])

    def allowed(batch_id, input_ids):  # the grammar of transformers' Emu3 docs
        offset = input_ids.shape[0] - int((input_ids == wrapper).nonzero()[0])
        if offset % (width + 1) == 0:
            return [eol]
        grid = (width + 1) * height
        return [closing[offset - grid - 1]] if offset > grid else visual

    out = model.generate(
        **enc, max_new_tokens=height * (width + 1) + 3, do_sample=False, prefix_allowed_tokens_fn=allowed
    )
    reference = model.decode_image_tokens(image_tokens=out[:, enc["input_ids"].shape[1] :], height=height, width=width)
    ours = interface.generate_images(["A red circle."], guidance_scale=1.0, temperature=0.0)
    torch.testing.assert_close(ours, interface._to_unit_range(reference), rtol=1e-4, atol=1e-4)
    assert interface.tokens_per_image() == height * (width + 1) + 3


def test_unsupported_model_error_lists_the_families(non_unified_model):
    with pytest.raises(UnsupportedModelError) as error:
        get_interface(non_unified_model)
    message = str(error.value)
    for family in ("janus", "emu3", "llava", "qwen2_vl", "idefics3", "paligemma", "understanding only"):
        assert family in message
    assert "docs/models.md" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_trains_the_llm_only(family, vqa_inputs):
    model, processor, interface = build(family)
    model = prepare_understanding_player(model, interface, peft_config=None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen_site = {id(p) for p in interface.understanding_site.parameters()}
    assert trainable and all(interface.is_understanding_parameter(n) for n in trainable)
    assert not any(id(p) in frozen_site and p.requires_grad for p in model.parameters()), "the site stays frozen"
    interface.understanding_loss(model, vqa_inputs(interface, 2)).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_skip_modules_known_before_loading(family, tmp_path):
    model, processor = BUILDERS[family](seed=0, save_dir=str(tmp_path))
    expected = get_interface(model, processor).quantization_skip_modules
    assert quantization_skip_modules_for(str(tmp_path)) == expected
    names = {n for n, _ in model.named_modules()}
    assert expected and all(name in names for name in expected)


@pytest.mark.parametrize("family", ["emu3", "llava"])
def test_example_real_path_picks_the_family(family, tmp_path, vqa):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from train_janus import main, make_parser

    BUILDERS[family](seed=0, save_dir=str(tmp_path / "model"))
    vqa.select(range(4)).to_parquet(str(tmp_path / "train.parquet"))
    argv = [
        "--model_name_or_path", str(tmp_path / "model"), "--dtype", "float32",
        "--dataset_name", "parquet", "--dataset_data_files", str(tmp_path / "train.parquet"),
        "--consistency_model", "none", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--num_candidates", "1", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
        "--disable_tqdm", "true", "--save_steps", "100",
    ]  # fmt: skip
    if family not in GENERATIVE:
        argv += ["--perturbed_weight", "0.5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = main(*make_parser().parse_args_and_config(args=argv))
    assert type(trainer.interface) is type(get_interface(trainer.model))
    assert type(trainer.interface) is {"emu3": Emu3Interface, "llava": LlavaInterface}[family]
    assert (len(trainer.buffer) > 0) == (family in GENERATIVE)
    assert (tmp_path / "run" / "perturber" / "model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["absolute", "relative"])
def test_attack_stays_in_budget_raises_the_loss_and_answers_under_it(family, budget, vqa, vqa_inputs):
    from trl_unigame.evaluation import UniGameEvaluator, perturbation_at, pgd_attack

    model, processor, interface = build(family)
    inputs = vqa_inputs(interface, 4)
    eps = 0.5 if budget == "absolute" else 0.2
    with torch.no_grad():
        clean = interface.understanding_loss(model, inputs)
    delta = pgd_attack(interface, model, inputs, eps=eps, steps=3, budget=budget)
    mask_fn = interface.site_mask("understanding")
    with torch.no_grad(), perturbation_at(interface.understanding_site, delta, mask_fn):
        attacked = interface.understanding_loss(model, inputs)
    assert attacked.sum() > clean.sum()
    norms = delta.norm(dim=-1)
    if budget == "absolute":
        assert (norms <= eps * (1 + 1e-4)).all()
    else:
        assert norms.max() > 0
    metrics = UniGameEvaluator(model, processor, attack_eps=[eps], attack_budget=budget, show_progress=False).evaluate(
        vqa.select(range(4))
    )
    key = f"attack_{'eps' if budget == 'absolute' else 'rel'}{eps:g}/vqa_accuracy"
    assert set(metrics) == {"clean/vqa_accuracy", key}


def test_emu3_compiled_generation_step_matches_eager():
    from transformers import CompileConfig

    model, processor, interface = build("emu3")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = interface.generate_images(["A red circle."], num_images=2, temperature=0.0)
    compiled = interface.generate_images(
        ["A red circle."], num_images=2, temperature=0.0, compile_config=CompileConfig(backend="aot_eager", mode=None)
    )
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    ((_, cache),) = interface._generation_caches.values()
    again = interface.generate_images(
        ["A red circle."], num_images=2, temperature=0.0, compile_config=CompileConfig(backend="aot_eager", mode=None)
    )
    assert next(iter(interface._generation_caches.values()))[1] is cache, "same shapes: the cache is kept and reset"
    assert torch.equal(again, compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("family", GENERATIVE)
def test_generation_loop_runs_on_its_kv_cache(family):
    """Each call of the LLM in the generation loop must find in the cache exactly the positions fed before it: a cache
    passed under a keyword the LLM does not read stays empty, and each step would see only its own token."""
    from transformers import Cache

    model, _, interface = build(family)
    calls = []

    def record(module, args, kwargs):
        (cache,) = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
        calls.append((cache, int(cache.get_seq_length()), kwargs["inputs_embeds"].shape[1]))

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        interface.generate_images(["A red circle.", "A blue square on a white background."], temperature=0.0)
    finally:
        handle.remove()
    cache = calls[0][0]
    fed = 0
    for step, (seen, filled, new) in enumerate(calls):
        assert seen is cache and filled == fed, f"call {step}: {filled} cached positions, {fed} fed before"
        fed += new
    assert int(cache.get_seq_length()) == fed
