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
