import os
import re

from huggingface_hub import ModelCard

from trl_unigame.model_card import base_model_name, base_model_reference, hub_repo_id, unigame_model_card
from trl_unigame.perturber import PAPER_URL


def card_links(text: str) -> set[str]:
    return set(re.findall(r"\]\((https?://[^)]+)\)", text))


def test_local_paths_and_builders_are_no_hub_ids(tmp_path):
    assert hub_repo_id("deepseek-community/Janus-Pro-1B") == "deepseek-community/Janus-Pro-1B"
    for name in (str(tmp_path), str(tmp_path / "gone"), "./model", "~/model", "a/b/c", "imagefolder", "parquet", ""):
        assert hub_repo_id(name) is None, name
    # a model loaded from a folder that is gone (a temporary one) names nothing that loads it
    assert base_model_reference(str(tmp_path / "gone")) == (None, None)


def test_a_base_model_is_named_by_its_hub_id_or_its_folders_name_only(tmp_path):
    from trl_unigame.testing.digits_janus import pretrained_tiny_janus_path

    assert base_model_name("deepseek-community/Janus-Pro-1B") == "deepseek-community/Janus-Pro-1B"
    assert base_model_name(pretrained_tiny_janus_path()) == "tiny_janus_digits"
    assert base_model_name(str(tmp_path / "my-model") + "/") == "my-model"
    assert base_model_name("") is None and base_model_name(None) is None


def test_the_card_links_only_what_exists():
    card = unigame_model_card(
        model_name="run",
        base_model="/tmp/tmpabcdef",  # a temporary folder, gone
        dataset_name="imagefolder",  # a `datasets` builder, not a Hub dataset
        tags=[],
        unigame_config={},
    )
    card = ModelCard(str(card))
    assert card.data.base_model is None and card.data.datasets is None
    assert "/tmp/tmpabcdef" not in card.content and "on `imagefolder`" in card.text
    assert card_links(card.text) == {PAPER_URL}  # no repository that may not exist, no Hub page of a builder
    card = unigame_model_card(
        model_name="run",
        base_model="deepseek-community/Janus-Pro-1B",
        dataset_name="HuggingFaceM4/VQAv2",
        tags=[],
        unigame_config={},
    )
    assert card_links(card.text) == {
        PAPER_URL,
        "https://huggingface.co/deepseek-community/Janus-Pro-1B",
        "https://huggingface.co/datasets/HuggingFaceM4/VQAv2",
    }


def test_a_local_folders_snippet_loads_the_perturber_from_its_own_folder(tmp_path):
    local = unigame_model_card("run", None, None, [], {}, model_path=str(tmp_path)).text
    assert f'Perturber.from_pretrained("{tmp_path}/perturber")' in local
    hub = unigame_model_card("run", None, None, [], {}, model_path="someone/run").text
    assert 'Perturber.from_pretrained("someone/run", subfolder="perturber")' in hub


def test_the_perturbers_card_records_no_local_path():
    from trl_unigame import Perturber
    from trl_unigame.testing import pretrained_tiny_janus

    model, _ = pretrained_tiny_janus()
    card = Perturber.for_model(model).generate_model_card()
    assert card.data.base_model is None  # not a Hub id: no metadata
    assert os.path.dirname(model.name_or_path) not in card.content and "`tiny_janus_digits`" in card.text
