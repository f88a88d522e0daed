import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture
def janus():
    from trl_unigame.testing import tiny_janus

    return tiny_janus(seed=0)


@pytest.fixture(scope="session")
def vqa():
    from trl_unigame.testing import tiny_vqa_dataset

    return tiny_vqa_dataset(16, seed=0)


@pytest.fixture(scope="session")
def clip_scorer():
    from trl_unigame import CLIPConsistencyScorer
    from trl_unigame.testing import tiny_clip

    model, processor = tiny_clip(seed=0)
    return CLIPConsistencyScorer(model=model, processor=processor)
