import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the tests run beside each other (xdist workers, the processes a test launches with
# `torchrun`, `accelerate launch` or the example scripts, which inherit this environment), and threads that outnumber
# the cores spin and wait on each other.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
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


@pytest.fixture
def non_unified_model():
    """A real transformers model with no visual-token interface (a tiny Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Stands in for the Hub at its network boundary: `create_repo` answers, `upload_folder` copies what would be
    uploaded into `.folder` and records repo ids in `.calls` (honouring `ignore_patterns`, and `run_as_future` as the Trainer uses it)."""
    import shutil
    from concurrent.futures import Future

    from huggingface_hub import HfApi

    uploaded = tmp_path / "uploaded"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        calls.append(repo_id)
        patterns = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        shutil.copytree(folder_path, uploaded, ignore=shutil.ignore_patterns(*patterns), dirs_exist_ok=True)
        if not run_as_future:
            return "commit"
        future = Future()
        future.set_result("commit")
        return future

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    from types import SimpleNamespace

    return SimpleNamespace(folder=uploaded, calls=calls)


@pytest.fixture
def vqa_inputs(vqa):
    """`vqa_inputs(interface, n)`: understanding inputs of the first `n` rows of the tiny VQA dataset."""

    def build(interface, n=4):
        rows = vqa.select(range(n))
        return interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])

    return build
