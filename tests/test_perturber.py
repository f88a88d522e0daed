import json
import os

import pytest
import torch
from host_reads import HostReads
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model

from trl_unigame import Perturber, PerturberConfig, get_interface
from trl_unigame.testing import tiny_janus


@settings(max_examples=25, deadline=None)
@given(
    rho=st.floats(-30, 30),
    eps_min=st.floats(0, 0.05),
    span=st.floats(1e-3, 0.5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_every_token_delta_has_norm_eps_and_eps_is_bounded(rho, eps_min, span, dtype, seed):
    eps_max = eps_min + span
    perturber = Perturber(
        PerturberConfig(hidden_size=16, eps_min=eps_min, eps_max=eps_max, eps_init=eps_min + span / 2)
    )
    with torch.no_grad():
        perturber.rho.fill_(rho)
    assert eps_min <= perturber.eps <= eps_max
    tokens = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    delta = perturber.delta(tokens)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.norm(dim=-1), torch.full((2, 5), perturber.eps), rtol=1e-4, atol=1e-7)
    assert perturber(tokens).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturbation_survives_low_precision_models(dtype, janus, vqa, vqa_inputs):
    model, processor = janus
    model.to(dtype)
    interface = get_interface(model, processor)
    perturber = Perturber.for_model(model).attach(model)
    captured = {}
    handle = interface.understanding_site.register_forward_hook(
        lambda m, a, o: captured.setdefault("out", []).append(o)
    )
    inputs = vqa_inputs(get_interface(model, processor), 3)
    with torch.no_grad():
        with perturber.disabled():
            model(
                **{k: v for k, v in inputs.items() if k != "labels"}
                | {"pixel_values": inputs["pixel_values"].to(dtype)}
            )
        model(
            **{k: v for k, v in inputs.items() if k != "labels"} | {"pixel_values": inputs["pixel_values"].to(dtype)}
        )
    handle.remove()
    clean, perturbed = captured["out"]
    assert perturbed.dtype == dtype
    # Computed in float32 then cast: the perturbed tokens move by about eps (up to the dtype's rounding).
    moved = (perturbed.float() - clean.float()).norm(dim=-1)
    assert (moved > 0).all()
    spacing = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    bound = spacing * clean.float().abs().amax(-1) * clean.shape[-1] ** 0.5
    assert ((moved - perturber.eps).abs() <= bound + 1e-6).all()


def test_disabled_or_detached_gives_the_clean_model(janus, vqa, vqa_inputs):
    model, processor = janus
    inputs = vqa_inputs(get_interface(model, processor), 3)
    interface = get_interface(model, processor)
    clean = interface.understanding_loss(model, inputs)
    perturber = Perturber.for_model(model, eps_max=0.5, eps_init=0.25).attach(model)
    assert not torch.equal(interface.understanding_loss(model, inputs), clean)
    with perturber.disabled():
        assert torch.equal(interface.understanding_loss(model, inputs), clean)
    perturber.detach()
    assert not perturber.is_attached
    assert torch.equal(interface.understanding_loss(model, inputs), clean)


def test_save_then_load_gives_identical_perturbed_outputs(tmp_path, janus, vqa, vqa_inputs):
    model, processor = janus
    inputs = vqa_inputs(get_interface(model, processor), 3)
    interface = get_interface(model, processor)
    perturber = Perturber.for_model(model, eps_max=0.5, eps_init=0.3, depth=2).attach(model)
    with torch.no_grad():
        perturber.rho.add_(0.7)
    expected = interface.understanding_loss(model, inputs)
    perturber.save_pretrained(tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == ["README.md", "config.json", "model.safetensors"]
    perturber.detach()
    loaded = Perturber.from_pretrained(tmp_path / "p").attach(model)
    assert loaded.config == perturber.config
    assert loaded.eps == pytest.approx(perturber.eps)
    torch.testing.assert_close(interface.understanding_loss(model, inputs), expected, rtol=0, atol=0)


def test_hidden_size_mismatch_names_both_sizes(janus):
    model, _ = janus
    perturber = Perturber(PerturberConfig(hidden_size=64))
    with pytest.raises(ValueError, match="64.*32"):
        perturber.attach(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(hidden_size=8, eps_min=0.03, eps_max=0.02), "eps_min < eps_max"),
        (dict(hidden_size=8, eps_init=0.5), "eps_init"),
        (dict(hidden_size=8, depth=0), "depth"),
        (dict(hidden_size=8, sites=["vision"]), "sites"),
        (dict(hidden_size=8, site_budgets={"understanding": {"row_scales": [2.0]}}), r"unknown keys \['row_scales'\]"),
        (dict(hidden_size=8, site_budgets={"generation": {"row_scales": [2.0, -1.0]}}), "finite numbers > 0"),
        (dict(hidden_size=8, site_budgets={"generation": {"row_scales": 2.0}}), "a factor per row"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerturberConfig(**kwargs)


@pytest.mark.parametrize("name, size, hidden", [("Janus-Pro-1B", "1b", 2048), ("Janus-Pro-7B", "7b", 4096)])
def test_overhead_is_under_one_percent(name, size, hidden):
    from transformers import JanusForConditionalGeneration

    from trl_unigame.testing import janus_pro_config

    with torch.device("meta"):
        model = JanusForConditionalGeneration(janus_pro_config(size))
        perturber = Perturber.for_model(model)
    model_params = sum(p.numel() for p in model.parameters())
    ratio = perturber.num_parameters() / model_params
    assert perturber.num_parameters() == 3 * hidden * hidden + 2 * hidden + 1
    assert ratio < 0.01, f"{name}: {perturber.num_parameters()} / {model_params} = {ratio:.4%}"


def test_push_to_hub_uploads_adapter_and_card(offline_hub, janus):
    from huggingface_hub import ModelCard

    model, _ = janus
    perturber = Perturber.for_model(model, base_model_name_or_path="deepseek-community/Janus-Pro-1B")
    perturber.push_to_hub("someone/janus-unigame-perturber")
    folder = offline_hub.folder
    assert offline_hub.calls == ["someone/janus-unigame-perturber"]
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "deepseek-community/Janus-Pro-1B"
    assert {"trl", "unigame"} <= set(card.data.tags)
    assert "arXiv:2511.19413" in card.text and "@article" in card.text
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 32
    loaded = Perturber.from_pretrained(folder)
    for a, b in zip(loaded.state_dict().values(), perturber.state_dict().values()):
        assert torch.equal(a, b)


def test_lives_beside_lora_in_one_directory(tmp_path, vqa, vqa_inputs):
    model, processor = tiny_janus(seed=0)
    interface = get_interface(model, processor)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=interface.lora_target_modules, init_lora_weights=False)
    )
    perturber = Perturber.for_model(peft_model, eps_max=0.5, eps_init=0.3).attach(peft_model)
    inputs = vqa_inputs(get_interface(peft_model, processor), 3)
    expected = interface.understanding_loss(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    perturber.save_pretrained(tmp_path / "perturber")
    assert {"adapter_config.json", "adapter_model.safetensors", "perturber"} <= set(os.listdir(tmp_path))

    base, _ = tiny_janus(seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    Perturber.from_pretrained(tmp_path / "perturber").attach(loaded)
    torch.testing.assert_close(get_interface(loaded, processor).understanding_loss(loaded, inputs), expected)


# --------------------------------------------------------------------------------------------- precision
def _tokens_of_norm(norm, shape=(4, 64, 2048), seed=0):
    tokens = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return tokens / tokens.norm(dim=-1, keepdim=True) * norm


def test_realized_perturbation_equals_the_intended_one_in_float32():
    perturber = Perturber(PerturberConfig(hidden_size=2048, width=32, eps_max=0.02, eps_init=0.01))
    with perturber.measuring() as measured:
        perturber(_tokens_of_norm(30.0))
    m = measured["understanding"]
    assert m["realized_delta_cosine"] == pytest.approx(1.0, abs=1e-3)
    assert m["realized_delta_norm"] == pytest.approx(perturber.eps, rel=1e-2)
    assert m["token_norm"] == pytest.approx(30.0, rel=1e-4)
    perturber(_tokens_of_norm(30.0))
    assert perturber.last_measurements == measured  # nothing measured outside `measuring()`


def test_measuring_covers_every_call_and_reads_the_device_once_on_exit():
    perturber = Perturber(PerturberConfig(hidden_size=2048, width=32, eps_max=0.02, eps_init=0.01))
    eps, tokens = perturber.eps, [_tokens_of_norm(10.0), _tokens_of_norm(30.0, seed=1)]
    with HostReads() as reads, reads.tolist_counted():
        with perturber.measuring() as measured:
            for t in tokens:  # e.g. two generated tokens
                perturber(t)
            inside = dict(measured), reads.total
        on_exit = reads.total
    assert inside == ({}, 0)  # nothing read back while the site runs: sums on the device
    assert on_exit == 1  # one read for the site, on exit
    m = measured["understanding"]
    assert m["token_norm"] == pytest.approx(20.0, rel=1e-4)  # both calls, not only the last
    assert m["realized_delta_norm"] == pytest.approx(eps, rel=1e-2)
    assert m["realized_delta_cosine"] == pytest.approx(1.0, abs=1e-3) and m["dtype"] == "float32"


def test_a_masked_site_without_a_graph_perturbs_and_measures_only_its_visual_positions():
    """Without a graph (image generation) a masked site computes every position and keeps the visual ones, reading
    nothing back to the host; with one it selects them. Both give the same output and the same measurements."""
    site = torch.nn.Identity()
    perturber = Perturber(PerturberConfig(hidden_size=16, width=8, eps_max=0.5, eps_init=0.3))
    mask = torch.tensor([[True, False, True], [False, False, True]])
    perturber._handles.append(
        site.register_forward_hook(lambda m, a, o: perturber._hook(m, a, o, mask_fn=lambda *_: mask))
    )
    tokens = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0)) * 3
    outputs, measurements = {}, {}
    for graph in (False, True):
        with torch.set_grad_enabled(graph), HostReads() as reads, perturber.measuring() as measured:
            outputs[graph] = site(tokens).detach()
            if not graph:
                assert reads.total == 0
        measurements[graph] = measured["understanding"]
    torch.testing.assert_close(outputs[False], outputs[True])
    assert torch.equal(outputs[False][~mask], tokens[~mask])
    assert (outputs[False][mask] - tokens[mask]).norm(dim=-1) == pytest.approx([perturber.eps] * 3, rel=1e-4)
    for key in ("realized_delta_norm", "intended_delta_norm", "realized_delta_cosine", "token_norm"):
        assert measurements[False][key] == pytest.approx(measurements[True][key], rel=1e-5), key


def test_bf16_rounds_an_absolute_budget_away_on_large_tokens_but_not_a_relative_one():
    absolute = Perturber(PerturberConfig(hidden_size=2048, width=32, eps_max=0.02, eps_init=0.019))
    relative = Perturber(PerturberConfig(hidden_size=2048, width=32, eps_max=0.02, eps_init=0.019, budget="relative"))
    cosines = {}
    for name, perturber in (("absolute", absolute), ("relative", relative)):
        for norm in (1.0, 100.0):
            with perturber.measuring() as measured:
                perturber(_tokens_of_norm(norm).to(torch.bfloat16))
            cosines[name, norm] = measured["understanding"]["realized_delta_cosine"]
    assert cosines["absolute", 1.0] > 0.95
    assert cosines["absolute", 100.0] < 0.5  # mostly rounding noise
    assert cosines["relative", 100.0] > 0.95 and cosines["relative", 1.0] > 0.95


@settings(max_examples=20, deadline=None)
@given(rho=st.floats(-30, 30), norm=st.floats(0.1, 200.0), seed=st.integers(0, 2**16))
def test_relative_budget_scales_with_the_token_norm_within_its_bounds(rho, norm, seed):
    perturber = Perturber(
        PerturberConfig(hidden_size=16, eps_min=0.001, eps_max=0.05, eps_init=0.01, budget="relative")
    )
    with torch.no_grad():
        perturber.rho.fill_(rho)
    tokens = _tokens_of_norm(norm, shape=(2, 3, 16), seed=seed)
    tokens[1] *= 2  # a second scale in the same batch
    ratio = perturber.delta(tokens).norm(dim=-1) / tokens.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, perturber.eps), rtol=1e-4, atol=1e-7)
    assert 0.001 <= perturber.eps <= 0.05


def test_each_site_uses_its_own_budget():
    config = PerturberConfig(
        hidden_size=16,
        eps_max=0.1,
        eps_init=0.05,
        budget="relative",
        site_budgets={"generation": {"budget": "absolute", "eps_max": 0.02}},
    )
    perturber = Perturber(config)
    tokens = _tokens_of_norm(10.0, shape=(3, 16))
    understanding = perturber.delta(tokens, "understanding").norm(dim=-1)
    generation = perturber.delta(tokens, "generation").norm(dim=-1)
    torch.testing.assert_close(understanding, torch.full((3,), 0.05 * 10.0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(generation, torch.full((3,), 0.01), rtol=1e-4, atol=1e-6)  # same fraction of its range
    with pytest.raises(ValueError, match="site_budgets"):
        PerturberConfig(hidden_size=16, site_budgets={"generation": {"eps_max": 0.0}})
    with pytest.raises(ValueError, match="budget"):
        PerturberConfig(hidden_size=16, budget="percent")


def test_budget_mode_and_site_budgets_survive_save_and_load(tmp_path, janus):
    model, _ = janus
    perturber = Perturber.for_model(
        model,
        budget="relative",
        eps_max=0.05,
        eps_init=0.02,
        site_budgets={"generation": {"budget": "absolute", "row_scales": [4, 2]}},
    )
    perturber.save_pretrained(tmp_path / "p")
    loaded = Perturber.from_pretrained(tmp_path / "p")
    assert loaded.config.budget == "relative"
    assert loaded.config.site_budget("generation") == ("absolute", 0.0, 0.05)
    assert loaded.config.row_scales("generation") == [4.0, 2.0] and loaded.config.row_scales("understanding") is None
    tokens = _tokens_of_norm(7.0, shape=(2, loaded.config.hidden_size))
    torch.testing.assert_close(loaded.delta(tokens), perturber.delta(tokens))
    assert "token's norm" in (tmp_path / "p" / "README.md").read_text()


def test_a_gradient_reading_perturber_reads_the_gradient_it_is_given_and_round_trips(tmp_path, janus, vqa_inputs):
    from trl_unigame.game.adversary import SiteCapture

    model, processor = janus
    interface = get_interface(model, processor)
    inputs = vqa_inputs(interface, 3)
    perturber = Perturber.for_model(model, eps_max=0.5, eps_init=0.3, inputs="features_and_gradient").attach(model)
    with perturber.disabled(), SiteCapture(interface) as capture, capture.recording():
        gradient = capture.site_gradient(interface.understanding_loss(model, inputs).sum())
    with torch.no_grad():
        blind = interface.understanding_loss(model, inputs)  # no gradient given: a zero gradient channel
        with perturber.gradients(understanding=gradient):
            informed = interface.understanding_loss(model, inputs)
        with perturber.gradients(understanding=torch.zeros_like(gradient)):
            zero = interface.understanding_loss(model, inputs)
        with perturber.gradients(understanding=gradient[:1]):  # given for another batch: not this call's
            other = interface.understanding_loss(model, inputs)
    assert not torch.allclose(informed, blind) and torch.equal(zero, blind) and torch.equal(other, blind)
    # At initialisation its direction mostly follows the gradient (gain 1): it raises every row's loss.
    assert (informed > blind).all()

    perturber.save_pretrained(tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert "features_and_gradient" in card
    perturber.detach()
    loaded = Perturber.from_pretrained(tmp_path / "p").attach(model)
    assert loaded.config.inputs == "features_and_gradient" and loaded.sees_gradient
    with torch.no_grad(), loaded.gradients(understanding=gradient):
        torch.testing.assert_close(interface.understanding_loss(model, inputs), informed, rtol=0, atol=0)
    # while generating, the generation site has no loss to differentiate: it reads a zero gradient channel
    with loaded.gradients(understanding=gradient), loaded.recording() as deltas:
        interface.generate_images(["a red circle"], generator=torch.Generator().manual_seed(0))
    assert deltas and all(d.norm(dim=-1).gt(0).all() for d in deltas)


def test_a_perturber_folder_from_before_the_input_modes_loads_as_features(tmp_path, janus, vqa_inputs):
    model, processor = janus
    interface = get_interface(model, processor)
    inputs = vqa_inputs(interface, 2)
    perturber = Perturber.for_model(model, eps_max=0.5, eps_init=0.3).attach(model)
    with torch.no_grad():
        expected = interface.understanding_loss(model, inputs)
    perturber.save_pretrained(tmp_path / "old")
    perturber.detach()
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["inputs"]  # what an older version wrote
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = Perturber.from_pretrained(tmp_path / "old").attach(model)
    assert loaded.config.inputs == "features" and not loaded.sees_gradient
    with torch.no_grad():
        torch.testing.assert_close(interface.understanding_loss(model, inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="inputs"):
        PerturberConfig(hidden_size=8, inputs="gradients")


def test_the_fixed_gradient_step_is_the_normalised_gradient_at_the_whole_budget(tmp_path):
    perturber = Perturber(
        PerturberConfig(hidden_size=16, eps_max=0.1, eps_init=0.02, budget="relative", inputs="gradient")
    )
    assert perturber.fixed_step and perturber.sees_gradient and len(perturber.mlp) == 0
    assert perturber.num_parameters() == 1  # the eps logit only, kept so that every perturber saves the same way
    generator = torch.Generator().manual_seed(0)
    tokens, gradient = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 5, 16, generator=generator)
    delta = perturber.delta(tokens, gradient=gradient)
    expected = 0.1 * tokens.norm(dim=-1, keepdim=True) * gradient / gradient.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(delta, expected)
    assert perturber.eps == pytest.approx(0.1) and not perturber.delta(tokens).any()  # no gradient: no step
    perturber.save_pretrained(tmp_path / "fgsm")
    assert 'inputs="gradient"' in (tmp_path / "fgsm" / "README.md").read_text()
    loaded = Perturber.from_pretrained(tmp_path / "fgsm")
    torch.testing.assert_close(loaded.delta(tokens, gradient=gradient), expected)


def test_the_fixed_gradient_step_needs_a_config_where_nothing_learns_and_the_model_trains_on_it(tmp_path):
    from trl_unigame import UniGameConfig

    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], perturber_inputs="gradient")
    with pytest.raises(ValueError, match="nothing learns .got adversarial_weight=120.0."):
        UniGameConfig(**common, perturbed_weight=0.5)
    with pytest.raises(ValueError, match="got perturbed_weight=0.0"):
        UniGameConfig(**common, adversarial_weight=0.0)
    UniGameConfig(**common, adversarial_weight=0.0, perturbed_weight=0.5)
