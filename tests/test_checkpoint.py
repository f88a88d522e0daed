import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from test_trainer import make_trainer as make_game_trainer  # noqa: E402
from transformers import TrainerCallback

from trl_unigame import HardSampleBuffer
from trl_unigame.game.checkpoint import load_buffer, load_game_state, save_buffer


OVERRIDES = dict(max_steps=2, save_strategy="steps", save_steps=2, buffer_capacity=4, hardness_quantile=0.0)


def make_trainer(output_dir, vqa, **overrides):
    """test_trainer's tiny game, checkpointing at its last step into `output_dir`."""
    return make_game_trainer(output_dir, vqa, **{**OVERRIDES, "output_dir": str(output_dir), **overrides})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, vqa):
    """A real run's checkpoint at step 2 (its last step) and the trainer that wrote it."""
    trainer = make_trainer(tmp_path_factory.mktemp("run"), vqa)
    trainer.train()
    assert len(trainer.buffer) > 0
    return trainer, os.path.join(trainer.args.output_dir, "checkpoint-2")


@pytest.fixture
def checkpoint(saved_run, tmp_path):
    """A copy of the saved checkpoint that a test may alter."""
    return shutil.copytree(saved_run[1], tmp_path / "checkpoint-2")


def as_former_checkpoint(checkpoint, trainer):
    """Turns a checkpoint into the former layout (pickled buffers, no record of the number of processes); returns the
    buffer state that the former trainer pickled: the one it held when it saved, at its last step."""
    for name in ("unigame_buffer_rank0.safetensors", "unigame_buffer_rank0.pt", "unigame_state.json"):
        (checkpoint / name).unlink(missing_ok=True)
    return trainer.buffer.state_dict()


class Payload:
    """Unpickling it creates `marker`: a stand-in for code hidden in a downloaded checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class TrainingStart(TrainerCallback):
    """Keeps a copy of the buffer as training starts, once the checkpoint has been restored."""

    def __init__(self, buffer):
        self.buffer, self.seen = buffer, []

    def on_train_begin(self, args, state, control, **kwargs):
        copy = HardSampleBuffer()
        copy.load_state_dict(self.buffer.state_dict())
        self.seen.append(copy)


def resume(trainer, checkpoint):
    """Resumes `trainer` from `checkpoint`; returns a copy of the buffer it held when training started."""
    start = TrainingStart(trainer.buffer)
    trainer.add_callback(start)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return start.seen[0]


def refused(trainer, checkpoint, error, match):
    """Resuming `trainer` from `checkpoint` raises `error` before training starts, and restores nothing."""
    start = TrainingStart(trainer.buffer)
    trainer.add_callback(start)
    perturber = snapshot(trainer.perturber)
    with pytest.raises(error, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert start.seen == [] and len(trainer.buffer) == 0
    for name, value in snapshot(trainer.perturber).items():
        assert torch.equal(value, perturber[name]), name


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_same_entries(a, b):
    assert len(a.entries) == len(b.entries)
    for x, y in zip(a.entries, b.entries):
        assert x.image.dtype == y.image.dtype == torch.uint8 and torch.equal(x.image, y.image)
        assert (x.row, x.hardness, x.consistency, x.step) == (y.row, y.hardness, y.consistency, y.step)
        assert x.extra.keys() == y.extra.keys()
        for key, value in x.extra.items():
            assert torch.equal(value, y.extra[key]) if isinstance(value, torch.Tensor) else value == y.extra[key]


# ------------------------------------------------------------------------------------------------ the buffer file
@pytest.mark.parametrize("pop", [False, True])
def test_buffer_file_round_trips_entries_scores_and_the_generator(tmp_path, pop):
    buffer = HardSampleBuffer(capacity=5, temperature=1.5, pop=pop, seed=7)
    generator = torch.Generator().manual_seed(0)
    messages = [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    pair = {"prompt": [{"role": "user", "content": "What shape?"}], "chosen": "a circle", "rejected": "a square"}
    rows = [
        {"question": "What colour?", "answer": "red", "prompt": "a red circle", "messages": messages},
        {"question": "What shape?", "answer": "a circle", "prompt": "a circle", "pair": pair},
        {"question": "Pourquoi ?", "answer": "parce que", "prompt": "ünïcödé ✓"},
        {"question": "How many?", "answer": "3", "prompt": "three dots"},
    ]
    for i, row in enumerate(rows):
        source = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8, generator=generator)
        buffer.push(
            torch.rand(3, 8, 8, generator=generator),
            row,
            hardness=1.0 / 3 + i,
            consistency=None if i == 1 else 0.1 * i + 1e-9,
            extra={"source": source, "label": f"shape {i}"} if i != 2 else None,
            step=10 + i,
        )
    buffer.sample(1)  # the generator has moved on from its seed
    path = str(tmp_path / "unigame_buffer_rank0.safetensors")

    save_buffer(buffer, path)

    assert os.listdir(tmp_path) == ["unigame_buffer_rank0.safetensors"]  # no temporary file is left
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "unigame_hard_sample_buffer"
    restored = HardSampleBuffer(capacity=1, temperature=9.0, seed=123)
    load_buffer(restored, path)
    assert (restored.capacity, restored.temperature, restored.pop) == (5, 1.5, pop)
    assert len(restored) == (3 if pop else 4)
    assert_same_entries(buffer, restored)
    assert torch.equal(restored.generator.get_state(), buffer.generator.get_state())
    for _ in range(2):  # the same draws, and with `pop` the same entries leave
        drawn, drawn_again = buffer.sample(2), restored.sample(2)
        assert [(e.row, e.hardness) for e in drawn] == [(e.row, e.hardness) for e in drawn_again]
        assert_same_entries(buffer, restored)


def test_buffer_file_names_a_row_that_it_cannot_store(tmp_path):
    buffer = HardSampleBuffer()
    buffer.push(torch.rand(3, 4, 4), {"question": "q", "answer": "a", "pair": {"chosen": {1, 2}}}, 1.0)
    with pytest.raises(TypeError, match=r"the row of buffer entry 0\['pair'\]\['chosen'\] is a set"):
        save_buffer(buffer, str(tmp_path / "buffer.safetensors"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------- resuming
def test_checkpoint_records_its_process_count_and_stores_the_buffer_without_pickle(saved_run):
    trainer, checkpoint = saved_run
    with open(os.path.join(checkpoint, "unigame_state.json")) as f:
        assert json.load(f) == {"format_version": 1, "world_size": 1}
    assert not [name for name in os.listdir(checkpoint) if name.startswith("unigame_buffer") and name.endswith(".pt")]
    restored = HardSampleBuffer()
    load_buffer(restored, os.path.join(checkpoint, "unigame_buffer_rank0.safetensors"))
    assert len(restored) > 0
    assert_same_entries(trainer.buffer, restored)
    assert torch.equal(restored.generator.get_state(), trainer.buffer.generator.get_state())


def test_resume_from_a_former_checkpoint_loads_its_pickled_buffer(saved_run, checkpoint, tmp_path, vqa):
    trainer = saved_run[0]
    torch.save(as_former_checkpoint(checkpoint, trainer), checkpoint / "unigame_buffer_rank0.pt")
    restored = resume(make_trainer(tmp_path / "resumed", vqa, max_steps=3), checkpoint)
    assert len(restored) > 0
    assert_same_entries(trainer.buffer, restored)
    assert torch.equal(restored.generator.get_state(), trainer.buffer.generator.get_state())


@pytest.mark.parametrize("carrier", ["unigame_buffer_rank0.pt", "perturber_optimizer.pt"])
def test_resume_never_unpickles_code_hidden_in_a_checkpoint(saved_run, checkpoint, tmp_path, vqa, carrier):
    marker = tmp_path / "code_ran"
    state = as_former_checkpoint(checkpoint, saved_run[0])
    if carrier == "perturber_optimizer.pt":
        torch.save(state, checkpoint / "unigame_buffer_rank0.pt")
        state = torch.load(checkpoint / carrier, weights_only=True)
        state["param_groups"][0]["note"] = Payload(marker)
    else:
        state["rows"][0] = {**state["rows"][0], "question": Payload(marker)}
    torch.save(state, checkpoint / carrier)
    resumed = make_trainer(tmp_path / "resumed", vqa, max_steps=4)
    refused(resumed, checkpoint, ValueError, rf"{carrier} .*holds objects other than tensors.*it was not loaded")
    assert not marker.exists()


def test_resume_with_fewer_processes_than_recorded_fails_before_training(checkpoint, tmp_path, vqa):
    with open(checkpoint / "unigame_state.json", "w") as f:
        json.dump({"format_version": 1, "world_size": 2}, f)
    for name in os.listdir(checkpoint):  # the second process's buffer, as a run of 2 processes leaves it
        if name.startswith("unigame_buffer_rank0."):
            shutil.copy(checkpoint / name, checkpoint / name.replace("rank0", "rank1"))
    resumed = make_trainer(tmp_path / "resumed", vqa, max_steps=4)
    refused(resumed, checkpoint, ValueError, r"written by 2 processes, but this run has 1\..*--num_processes 2")


def test_resume_counts_the_buffers_of_a_former_checkpoint_that_has_no_record(saved_run, checkpoint, tmp_path, vqa):
    state = as_former_checkpoint(checkpoint, saved_run[0])
    for rank in (0, 1):
        torch.save(state, checkpoint / f"unigame_buffer_rank{rank}.pt")
    resumed = make_trainer(tmp_path / "resumed", vqa, max_steps=4)
    refused(resumed, checkpoint, ValueError, r"written by 2 processes, but this run has 1\.")


def test_resume_from_a_checkpoint_whose_perturber_optimizer_has_one_group(saved_run, checkpoint, tmp_path, vqa):
    # Release 0.3 kept the perturber's AdamW in one group (every parameter decayed): it resumes as today's two.
    trainer, _ = saved_run
    state = torch.load(checkpoint / "perturber_optimizer.pt", weights_only=True)
    assert len(state["param_groups"]) == 2
    today = [p for group in trainer.perturber_optimizer.param_groups for p in group["params"]]
    order = {id(p): j for j, p in enumerate(today)}
    former = {  # 0.3 decayed every parameter, the eps logit included
        "state": {i: state["state"][order[id(p)]] for i, p in enumerate(trainer.perturber.parameters())},
        "param_groups": [{**state["param_groups"][0], "weight_decay": 0.1, "params": list(range(len(today)))}],
    }
    torch.save(former, checkpoint / "perturber_optimizer.pt")

    def restored(path, name):
        trainer = make_trainer(tmp_path / name, vqa, max_steps=2, perturber_weight_decay=0.1)
        load_game_state(
            str(path),
            perturber=trainer.perturber,
            perturber_optimizer=trainer.perturber_optimizer,
            buffer=trainer.buffer,
            process_index=0,
            num_processes=1,
        )
        return trainer

    restored, expected = restored(checkpoint, "former"), restored(saved_run[1], "today")
    a, b = restored.perturber_optimizer.state_dict(), expected.perturber_optimizer.state_dict()
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert [g["weight_decay"] for g in a["param_groups"]] == [0.1, 0.0]  # the matrices only
    for j, moments in b["state"].items():
        for key, value in moments.items():
            assert torch.equal(a["state"][j][key], value), (j, key)
