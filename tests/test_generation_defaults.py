"""Image generation takes its guidance scale and temperature from the model's `generation_config` when the caller gives
none, and the caller's values win."""

import pytest
import torch

from trl_unigame import UniGameConfig, get_interface


PROMPTS = ["a red circle", "a blue square"]


def draw(interface, seed=0, **settings):
    return interface.generate_images(PROMPTS, num_images=2, generator=torch.Generator().manual_seed(seed), **settings)


def test_guidance_comes_from_the_models_generation_config(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    assert model.generation_config.guidance_scale is None
    assert interface.generation_settings() == (5.0, 1.0)  # the model says nothing: today's values
    default = draw(interface)
    torch.testing.assert_close(default, draw(interface, guidance_scale=5.0, temperature=1.0), rtol=0, atol=0)

    model.generation_config.guidance_scale = 2.0
    assert interface.generation_settings() == (2.0, 1.0)
    from_model = draw(interface)
    torch.testing.assert_close(from_model, draw(interface, guidance_scale=2.0), rtol=0, atol=0)
    assert not torch.equal(from_model, default)  # same seed, another guidance: other images
    # The caller's value wins over the model's.
    torch.testing.assert_close(draw(interface, guidance_scale=5.0), default, rtol=0, atol=0)


def test_temperature_comes_from_the_models_generation_config(janus):
    model, processor = janus
    interface = get_interface(model, processor)
    default = draw(interface, seed=1)
    model.generation_config.do_sample = True  # a sampling temperature is only valid in a sampling config
    model.generation_config.temperature = 0.3
    assert interface.generation_settings() == (5.0, 0.3)
    from_model = draw(interface, seed=1)
    torch.testing.assert_close(from_model, draw(interface, seed=1, temperature=0.3), rtol=0, atol=0)
    assert not torch.equal(from_model, default)
    torch.testing.assert_close(draw(interface, seed=1, temperature=1.0), default, rtol=0, atol=0)
    assert interface.generation_settings(guidance_scale=4.0, temperature=0.0) == (4.0, 0.0)  # 0 (greedy) is kept


def test_the_shipped_digits_model_draws_at_guidance_3_and_temperature_0_7(tmp_path):
    from transformers import GenerationConfig

    from trl_unigame.testing import pretrained_tiny_janus, pretrained_tiny_janus_path

    model, processor = pretrained_tiny_janus()
    assert get_interface(model, processor).generation_settings() == (3.0, 0.7)
    config = GenerationConfig.from_pretrained(pretrained_tiny_janus_path())
    assert (config.guidance_scale, config.temperature, config.do_sample) == (3.0, 0.7, True)
    config.save_pretrained(tmp_path)  # a valid config: a full fine-tuned model saves with it


def test_config_leaves_generation_to_the_model_by_default(tmp_path):
    args = UniGameConfig(output_dir=str(tmp_path), use_cpu=True, consistency_model=None)
    assert args.generation_guidance_scale is None and args.generation_temperature is None
    with pytest.raises(ValueError, match="generation_guidance_scale"):
        UniGameConfig(output_dir=str(tmp_path), use_cpu=True, generation_guidance_scale=0.5)
    with pytest.raises(ValueError, match="generation_temperature"):
        UniGameConfig(output_dir=str(tmp_path), use_cpu=True, generation_temperature=-1.0)


def test_mining_draws_with_the_models_settings_unless_the_config_sets_them(janus, vqa, tmp_path):
    from trl_unigame import UniGameTrainer

    model, processor = janus
    model.generation_config.guidance_scale = 2.5

    def mined_settings(**config):
        args = UniGameConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            max_steps=1,
            per_device_train_batch_size=2,
            num_candidates=2,
            consistency_model=None,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            **config,
        )
        trainer = UniGameTrainer(model, args, train_dataset=vqa, processing_class=processor)
        used = []
        loop = trainer.interface._generate_image_tokens

        def spy(*args, **kwargs):
            used.append(trainer.interface.generation_settings(kwargs["guidance_scale"], kwargs["temperature"]))
            return loop(*args, **kwargs)

        trainer.interface._generate_image_tokens = spy
        trainer.train()
        return set(used)

    assert mined_settings() == {(2.5, 1.0)}
    assert mined_settings(generation_guidance_scale=4.0, generation_temperature=0.5) == {(4.0, 0.5)}
