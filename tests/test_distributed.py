import os
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
