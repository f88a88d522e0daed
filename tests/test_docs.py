"""The docs list every config field and every script option: adding one without documenting it fails here."""

import os
import sys
from dataclasses import fields

from trl_unigame.unigame_config import UniGameArguments


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def read(name):
    with open(os.path.join(DOCS, name)) as f:
        return f.read()


def test_every_game_field_is_documented():
    api = read("api.md")
    missing = [f.name for f in fields(UniGameArguments) if f"`{f.name}`" not in api]
    assert not missing, f"docs/api.md does not document {missing}"
    docstring = UniGameArguments.__doc__
    assert not [f.name for f in fields(UniGameArguments) if f.name not in docstring]


def test_every_script_option_is_documented():
    sys.path.insert(0, os.path.join(os.path.dirname(DOCS), "examples"))
    from train_janus import UniGameScriptArguments
    from trl import ModelConfig

    page = read("train_janus.md")
    missing = [
        f.name for cls in (UniGameScriptArguments, ModelConfig) for f in fields(cls) if f"--{f.name}" not in page
    ]
    assert not missing, f"docs/train_janus.md does not list {missing}"


def test_every_pretraining_option_is_documented():
    sys.path.insert(0, os.path.join(os.path.dirname(DOCS), "scripts"))
    from pretrain_tiny_janus import PretrainArguments

    page = read("tiny_model.md")
    missing = [f.name for f in fields(PretrainArguments) if f"`--{f.name}`" not in page]
    assert not missing, f"docs/tiny_model.md does not list {missing}"
