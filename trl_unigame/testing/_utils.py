"""What every tiny fixture does the same way: train a BPE tokenizer, build seeded weights, write a checkpoint and
load it back with `from_pretrained`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def checkpoint_dir(save_dir: str | None = None) -> Iterator[str]:
    """Yields `save_dir` (created if needed), or a temporary directory removed on exit when it is not given."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_dir or tmp
        os.makedirs(path, exist_ok=True)
        yield path


def bpe_tokenizer(
    corpus: list[str],
    vocab_size: int,
    special_tokens: list[str],
    added_tokens: list[str],
    bos_token: str,
    eos_token: str,
    extra_special_tokens: dict[str, str] | None = None,
):
    """A `PreTrainedTokenizerFast` with a BPE trained here on `corpus` (`special_tokens` first, `vocab_size` ids at
    most), then `added_tokens` as special tokens after the learned ones. Pads on the left, as generation needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(added_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra_special_tokens or {},
        padding_side="left",
    )


def seeded_model(model_cls, config, seed: int, tokenizer, **generation_kwargs):
    """`model_cls(config)` with the weights of `seed`; a generative model gets the generation config of `tokenizer`
    (`generation_kwargs` are the model's own generation options)."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config)
    if model.can_generate():
        kwargs = {"generation_kwargs": generation_kwargs} if generation_kwargs else {}
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    return model


def write_checkpoint(model, save_dir: str) -> None:
    """Writes the config, generation config and weights of `model` in the layout `from_pretrained` reads."""
    from safetensors.torch import save_model

    # File by file (not `model.save_pretrained`, which writes on rank 0 only) so that every process of a distributed
    # test can build its own copy.
    model.config.save_pretrained(save_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(save_dir)
    save_model(model, os.path.join(save_dir, "model.safetensors"), metadata={"format": "pt"})


def forget_temporary_folder(model, save_dir: str | None):
    """Returns `model`; loaded from a temporary folder (`save_dir` not given, removed on return), it names no folder, as
    a model built from a config: PEFT's `save_pretrained` would look for that folder's `config.json` ("Could not find a
    config file") and a model card would name it."""
    if save_dir is None:
        model.name_or_path = model.config.name_or_path = ""
    return model


def build_and_reload(model_cls, config, processor, seed: int, save_dir: str | None = None, **from_pretrained_kwargs):
    """Returns `(model, processor)`: a seeded `model_cls(config)` and `processor`, written to `save_dir` (a temporary
    directory when not given) and loaded back with `from_pretrained`, as a real checkpoint would be."""
    with checkpoint_dir(save_dir) as path:
        model = seeded_model(model_cls, config, seed, processor.tokenizer)
        processor.save_pretrained(path)
        write_checkpoint(model, path)
        loaded = model_cls.from_pretrained(path, **from_pretrained_kwargs)
        return forget_temporary_folder(loaded, save_dir), type(processor).from_pretrained(path)


def tiny_vision_config(**overrides) -> dict:
    """A one-layer ViT (CLIP, SigLIP and Idefics3 towers share these fields): width 32, 16x16 images in 4x4 patches."""
    config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 16,
        "patch_size": 4,
    }
    config.update(overrides)
    return config
