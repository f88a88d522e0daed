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
    assert any("lora_" in n for n in rank0["params"]) and any("perturber." in n for n in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
