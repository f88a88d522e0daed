import os
import signal
import subprocess

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "update, stacking, port", [("mixed", "plain", 29531), ("separate", "plain", 29532), ("mixed", "sft", 29533)]
)
def test_ranks_with_different_buffers_neither_hang_nor_diverge(tmp_path, update, stacking, port):
    # Rank 1 keeps no candidate for its first 3 mining rounds while rank 0 fills its buffer (and pops from it).
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        os.path.join(ROOT, "tests", "ddp_uneven_worker.py"),
        str(tmp_path),
        update,
        stacking,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run hung: the ranks stopped pairing their collectives")
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank1["kept"][:3] == [0.0, 0.0, 0.0] and all(k > 0 for k in rank0["kept"][:3])
    # the logs are the same on every process: the game's metrics are reduced across processes
    assert rank0["logged"] == rank1["logged"]
    for logged, kept0, kept1 in zip(rank0["logged"], rank0["kept"], rank1["kept"]):
        assert logged == pytest.approx((kept0 + kept1) / 2)
    assert any("lora_" in n for n in rank0["params"]) and any("perturber." in n for n in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name


@pytest.mark.slow
def test_evaluation_under_two_processes_shards_the_rows_and_agrees_with_one_process(tmp_path):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from eval_shard_worker import eval_rows, evaluate

    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29534",
        os.path.join(ROOT, "tests", "eval_shard_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single_metrics, single_predictions, single_answered = evaluate(eval_rows())
    # each process answered its own rows (4 and 3 of 7, under 4 conditions), none twice
    assert (rank0["answered"], rank1["answered"]) == (4 * 4, 3 * 4) and single_answered == 7 * 4
    # every process returns the whole dataset's predictions, in the dataset's order
    assert rank0["predictions"] == rank1["predictions"] and rank0["metrics"] == rank1["metrics"]
    assert [p["index"] for p in rank0["predictions"]] == list(range(7))
    # the same answers row by row as one process, for every condition whose inputs do not depend on sampling (the
    # round trip draws its images from one generator per process, so its samples depend on the sharding)
    for name in ("clean", "attack_rel0.05", "corrupt_noise_3"):
        assert [p[name] for p in rank0["predictions"]] == [p[name] for p in single_predictions], name
        assert rank0["metrics"][f"{name}/vqa_accuracy"] == pytest.approx(single_metrics[f"{name}/vqa_accuracy"])
    assert all(p["consistency"] is not None for p in rank0["predictions"])
    assert 0 <= rank0["metrics"]["consistency/judge_score"] <= 1
    assert single_metrics["clean/vqa_accuracy"] > 0.5  # a model that answers: agreement means something


@pytest.mark.slow
def test_generation_adversary_under_two_processes_averages_its_gradient_and_keeps_ranks_identical(tmp_path):
    # Each rank mines its own candidates (its own gradient); both step on the mean and end with the same perturber.
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29536",
        os.path.join(ROOT, "tests", "ddp_generation_adversary_worker.py"),
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run hung: the ranks stopped pairing their collectives")
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    # one step per mining round (every optimizer step), none skipped, each on the mean of the two ranks' gradients
    assert len(rank0["exchanged"]) == len(rank1["exchanged"]) == 3
    for (own0, mean0), (own1, mean1) in zip(rank0["exchanged"], rank1["exchanged"]):
        assert mean0 is not None and mean1 is not None
        assert any(not torch.equal(a, b) for a, b in zip(own0, own1))  # each rank's own candidates
        for a, b, m0, m1 in zip(own0, own1, mean0, mean1):
            assert torch.equal(m0, m1)
            torch.testing.assert_close(m0, (a + b) / 2, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for _, mean in rank0["exchanged"] for g in mean)
    # the same perturber on both ranks, moved from its initial weights
    assert rank0["initial"].keys() == rank0["perturber"].keys() == rank1["perturber"].keys()
    for name, value in rank0["perturber"].items():
        assert torch.equal(value, rank1["perturber"][name]), name
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
    assert any(not torch.equal(rank0["initial"][n], p) for n, p in rank0["perturber"].items())
    # the same optimizer state on both ranks, one step per round, with non-zero moments
    state0, state1 = rank0["optimizer"]["state"], rank1["optimizer"]["state"]
    assert state0.keys() == state1.keys() and len(state0) == len(rank0["perturber"])
    for index, values in state0.items():
        assert float(values["step"]) == 3
        for key, value in values.items():
            assert torch.equal(value, state1[index][key]), (index, key)
    assert any(values["exp_avg"].abs().max() > 0 for values in state0.values())
    assert rank0["optimizer"]["param_groups"] == rank1["optimizer"]["param_groups"]
    assert rank0["logged"] == rank1["logged"] and all(loss is not None for loss in rank0["logged"])


def _launch_sharded_worker(
    engine, output_dir, port, update, checkpointing, resume_from=None, timeout=300, **env_extra
):
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        os.path.join(ROOT, "tests", "sharded_worker.py"),
        engine,
        str(output_dir),
        update,
        checkpointing,
    ] + ([str(resume_from)] if resume_from else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env_extra}
    # its own process group: a hang kills torchrun and both workers, which would otherwise wait on forever
    launch = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        launch.communicate()
        pytest.fail(f"the 2-process {engine} run hung: the ranks stopped pairing their collectives")
    assert launch.returncode == 0, stderr[-4000:]
    return [torch.load(output_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


deepspeed_installed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="needs `pip install deepspeed`"
)


def _check_identical_ranks_and_outputs(tmp_path, rank0, rank1):
    """The same full weights on both ranks (LoRA gathered from its shards; the replicated perturber), the perturber
    moved, the final adapter and perturber load back with the trained weights, the pictures were drawn."""
    assert all("unigame/clean_generation_consistency" in log for log in rank0["logged"][::2])
    assert len(rank0["params"]) > 0 and all("lora_" in name for name in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    for name, value in rank0["perturber"].items():
        assert torch.equal(value, rank1["perturber"][name]), name
    assert rank0["seen"][-1]["perturber"] != rank0["seen"][0]["perturber"]  # the perturber moved
    _check_final_adapter_and_perturber(tmp_path, rank0)
    assert (tmp_path / "pictures" / "hard_samples_step2.png").is_file()


def _check_final_adapter_and_perturber(tmp_path, rank0):
    from peft import PeftModel

    from trl_unigame import Perturber
    from trl_unigame.testing import tiny_janus

    base, _ = tiny_janus(seed=0, save_dir=str(tmp_path / "reload"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    weights = dict(loaded.named_parameters())
    for name, value in rank0["params"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)
    perturber = Perturber.from_pretrained(str(tmp_path / "final" / "perturber"))
    for name, value in perturber.named_parameters():
        assert torch.equal(value, rank0["perturber"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "update, checkpointing, port", [("exact", "off", 29537), ("exact", "on", 29538), ("first_order", "off", 29539)]
)
def test_game_under_fsdp2_on_two_cpu_processes(tmp_path, update, checkpointing, port):
    # The Trainer's own FSDP arguments (fsdp="full_shard", fsdp_config version 2) on a CPU, gloo: the whole game
    # (perturber step, mining, buffer pass, generation check, pictures, evaluation with generated answers).
    rank0, rank1 = _launch_sharded_worker("fsdp2", tmp_path, port, update, checkpointing)
    for rank in (rank0, rank1):
        assert rank["fsdp"] and rank["world"] == 2
        # sharded while training: every trainable parameter a DTensor, each process holding half of them
        for seen in rank["seen"]:
            assert seen["dtensor"] and 2 * seen["local_elements"] == seen["full_elements"]
            assert seen["every_parameter_dtensor"]  # mining's full_parameters leaves nothing gathered
            assert seen["checkpointed"] == (checkpointing == "on")
        assert all(mined == 4 for mined in rank["mined"]) and rank["buffer"] > 0  # every step mined, on every rank
        assert rank["metrics"]["eval_clean/vqa_accuracy"] is not None
    assert rank0["logged"] == rank1["logged"]
    _check_identical_ranks_and_outputs(tmp_path, rank0, rank1)
    assert (tmp_path / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # a sharded checkpoint


@pytest.mark.slow
def test_generation_anchors_under_fsdp2_on_two_cpu_processes(tmp_path):
    # Each process draws its rows' prompts with the adapter off, inside the gathered parameters (every process enters
    # together), then trains the generation loss on them: no hang, and the ranks stay identical.
    rank0, rank1 = _launch_sharded_worker("fsdp2", tmp_path, 29550, "first_order", "off", GENERATION_ANCHORS="3")
    for rank in (rank0, rank1):
        assert len(rank["anchors"]) == 3
        assert all(log["unigame/generation_loss"] > 0 for log in rank["logged"])
        assert all(seen["every_parameter_dtensor"] for seen in rank["seen"])  # drawing left nothing gathered
    assert rank0["logged"] == rank1["logged"]
    _check_identical_ranks_and_outputs(tmp_path, rank0, rank1)


@pytest.mark.slow
@deepspeed_installed
@pytest.mark.parametrize("engine, update, port", [("zero2", "exact", 29543), ("zero3", "first_order", 29544)])
def test_game_under_deepspeed_zero_on_two_cpu_processes(tmp_path, engine, update, port):
    # The Trainer's `deepspeed` argument on a CPU (DeepSpeed's CPU accelerator, gloo): the whole game, with process
    # 1's loss not finite at step 1: DeepSpeed skips that update on both processes, and the game logs the skip.
    rank0, rank1 = _launch_sharded_worker(engine, tmp_path, port, update, "off", NAN_AT_STEP="1")
    for rank in (rank0, rank1):
        assert rank["deepspeed"] and not rank["fsdp"] and rank["world"] == 2
        assert rank["zero_stage"] == int(engine[-1])  # the engine runs the stage asked for
        for seen in rank["seen"]:
            # ZeRO-3 partitions every trainable parameter (each process holds half); ZeRO-2 keeps them whole
            assert seen["zero3"] == (engine == "zero3")
            if engine == "zero3":
                assert 2 * seen["local_elements"] == seen["full_elements"]
        assert all(mined == 4 for mined in rank["mined"]) and rank["buffer"] > 0  # every step mined, on every rank
        assert rank["metrics"]["eval_clean/vqa_accuracy"] is not None
        checksums = [seen["checksum"] for seen in rank["seen"]]
        # the update of step 1 was dropped (no `p.grad` to inspect: the engine skipped it) and the game said so, on
        # each process (counts are summed over processes)
        assert checksums[1] == checksums[0] and checksums[2] != checksums[1] and checksums[0] != rank["begin"]
        assert rank["skipped"][1] == 2 and not any(rank["skipped"][i] for i in (0, 2, 3))
    assert repr(rank0["logged"]) == repr(rank1["logged"])  # the same logs (repr: step 1's losses are NaN)
    _check_identical_ranks_and_outputs(tmp_path, rank0, rank1)
    assert (tmp_path / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own (partitioned) checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("engine, port", [("fsdp2", 29548), pytest.param("zero3", 29549, marks=deepspeed_installed)])
def test_exact_step_with_a_non_finite_loss_on_one_sharded_process_skips_on_every_process(tmp_path, engine, port):
    # Process 1's loss is not finite at step 1. The exact step's backward all-gathers the layers' shards (FSDP2,
    # ZeRO-3), so process 1 runs it too, and both leave the perturber and U as they were for that step. A hang fails
    # at the launch's timeout (the workers print their stacks first).
    rank0, rank1 = _launch_sharded_worker(
        engine, tmp_path, port, "exact", "off", NAN_AT_STEP="1", SHARDED_WORKER_DUMP_AFTER="270"
    )
    for rank in (rank0, rank1):
        assert rank["world"] == 2 and (rank["fsdp"] if engine == "fsdp2" else rank["zero_stage"] == 3)
        perturber = [seen["perturber"] for seen in rank["seen"]]
        checksums = [seen["checksum"] for seen in rank["seen"]]
        assert perturber[1] == perturber[0] and perturber[2] != perturber[1]
        assert checksums[1] == checksums[0] and checksums[2] != checksums[1]
        # each process counts the skip (counts are summed over processes)
        for skipped in (rank["skipped_perturber"], rank["skipped"]):
            assert skipped[1] == 2 and not any(skipped[i] for i in (0, 2, 3))
    assert repr(rank0["logged"]) == repr(rank1["logged"])  # repr: step 1's losses are NaN
    _check_identical_ranks_and_outputs(tmp_path, rank0, rank1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, update, ports",
    [
        ("fsdp2", "first_order", (29540, 29541)),
        pytest.param("zero3", "exact", (29545, 29546), marks=deepspeed_installed),
    ],
)
def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(tmp_path, engine, update, ports):
    # with activation checkpointing, resumed at step 2 of 4 from the engine's sharded checkpoint
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole, _ = _launch_sharded_worker(engine, tmp_path / "whole", ports[0], update, "on")
    resumed, _ = _launch_sharded_worker(
        engine, tmp_path / "resumed", ports[1], update, "on", resume_from=tmp_path / "whole" / "checkpoint-2"
    )
    assert resumed["begin"] == whole["seen"][1]["checksum"]  # the adapter resumed from the shards
    for name, value in whole["params"].items():
        assert torch.equal(value, resumed["params"][name]), name
    for name, value in whole["perturber"].items():
        assert torch.equal(value, resumed["perturber"][name]), name
    assert resumed["logged"] == whole["logged"]


def test_separate_understanding_update_under_deepspeed_is_refused():
    # the engine steps inside the backward: the separate buffer step could neither clip nor drop a non-finite update
    from types import SimpleNamespace

    from trl_unigame.game.sharding import check_deepspeed_options

    trainer = SimpleNamespace(is_deepspeed_enabled=True, args=SimpleNamespace(understanding_update="separate"))
    with pytest.raises(ValueError, match="understanding_update='mixed'"):
        check_deepspeed_options(trainer)
    trainer.args.understanding_update = "mixed"
    check_deepspeed_options(trainer)
    check_deepspeed_options(
        SimpleNamespace(is_deepspeed_enabled=False, args=SimpleNamespace(understanding_update="separate"))
    )


def test_fsdp_on_a_torch_older_than_the_tested_one_is_refused_at_set_up(monkeypatch):
    from types import SimpleNamespace

    from torch.torch_version import TorchVersion

    from trl_unigame.game.sharding import check_fsdp_options

    plugin = SimpleNamespace(activation_checkpointing=False)
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        model=torch.nn.Linear(2, 2),
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0+cu128"))
    with pytest.raises(RuntimeError, match=r"needs torch>=2\.13 \(found 2\.11\.0\+cu128\)"):
        check_fsdp_options(trainer)
    check_fsdp_options(SimpleNamespace(is_fsdp_enabled=False))  # without FSDP, any torch
    for version in ("2.13.0+cpu", "2.14.0a0+git1234"):
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))
        check_fsdp_options(trainer)


def test_fsdp2_private_state_of_an_unchecked_layout_fails_clearly():
    # Releases before pytorch#173509 keep one `_fsdp_param_group`, not a list: a clear error, not an AttributeError.
    from types import SimpleNamespace

    from trl_unigame.game.sharding import _FSDP2PrivateState

    state = SimpleNamespace(_fsdp_param_group=None, _lazy_init=lambda: None, _auto_reshard_after_forward=True)
    with pytest.raises(RuntimeError, match="differs from the one UniGame's `full_parameters` was checked on"):
        _FSDP2PrivateState(SimpleNamespace(_get_fsdp_state=lambda: state))


def test_fsdp_activation_checkpointing_with_an_adapter_is_refused():
    # FSDP's own checkpoint wrappers rename the layers: PEFT would find no adapter weight to save.
    from types import SimpleNamespace

    from peft import LoraConfig

    from trl_unigame.game.sharding import check_fsdp_options
    from trl_unigame.interfaces import get_interface
    from trl_unigame.testing import tiny_janus
    from trl_unigame.unigame_trainer import prepare_understanding_player

    model, processor = tiny_janus(seed=0)
    model = prepare_understanding_player(model, get_interface(model, processor), LoraConfig(r=2))
    plugin = SimpleNamespace(activation_checkpointing=True)
    trainer = SimpleNamespace(
        is_fsdp_enabled=True, model=model, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    )
    with pytest.raises(ValueError, match="activation_checkpointing=True"):
        check_fsdp_options(trainer)
    plugin.activation_checkpointing = False
    check_fsdp_options(trainer)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, port",
    [("fsdp_cpu", 29542), pytest.param("zero3_cpu", 29547, marks=deepspeed_installed)],
)
def test_example_shards_through_accelerate_launch_on_cpu(tmp_path, config, port):
    # examples/accelerate_configs/fsdp_cpu.yaml with `--use_cpu true`, or zero3_cpu.yaml (ZeRO-3, the model
    # partitioned as it loads): the example's offline default, sharded.
    from peft import PeftModel

    from trl_unigame import Perturber
    from trl_unigame.testing import pretrained_tiny_janus

    out = tmp_path / "run"
    command = [
        "accelerate",
        "launch",
        "--config_file",
        os.path.join(ROOT, "examples", "accelerate_configs", f"{config}.yaml"),
        "--main_process_port",
        str(port),
        os.path.join(ROOT, "examples", "train_janus.py"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--save_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--compare_scans",
        "6",
        "--picture_steps",
        "1",
        "--disable_tqdm",
        "true",
    ] + (["--use_cpu", "true"] if config == "fsdp_cpu" else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process {config} run hung: the ranks stopped pairing their collectives")
    assert result.returncode == 0, result.stderr[-4000:]
    # the engine's own sharded checkpoint: it sharded
    sharded = "pytorch_model_fsdp_0" if config == "fsdp_cpu" else "global_step2"
    assert (out / "checkpoint-2" / sharded).is_dir()
    assert (out / "checkpoint-2" / "perturber" / "model.safetensors").is_file()
    assert "| this digit (pretrained): clean |" in result.stdout  # the before/after table, evaluated sharded
    assert (out / "hard_samples.png").is_file() and (out / "pictures" / "hard_samples_step2.png").is_file()
    base, _ = pretrained_tiny_janus()
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in model.named_parameters())  # trained, not empty
    Perturber.from_pretrained(str(out / "perturber")).attach(model)
