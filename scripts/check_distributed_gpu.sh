#!/usr/bin/env bash
# The distributed checks of tests/test_distributed.py, on GPUs: the example's offline default (the tiny digits Janus,
# mining, buffer, pictures, before/after evaluation) under DDP, FSDP2, ZeRO-2 and ZeRO-3 with the shipped GPU
# accelerate configs (NCCL, bf16), 4 steps with a checkpoint at step 2; then each run resumed from that checkpoint,
# whose final adapter and perturber must match the uninterrupted run's (to bf16 tolerance: GPU kernels are not
# bitwise deterministic). A few minutes in all.
#
#   bash scripts/check_distributed_gpu.sh                    # every GPU of the machine (at least 1)
#   NUM_PROCESSES=2 CONFIGS="fsdp zero3" bash scripts/check_distributed_gpu.sh
#
# Needs `pip install -e ".[deepspeed]"` for the ZeRO configs. Writes under ${OUT:-distributed-gpu-check}/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-distributed-gpu-check}
NUM_PROCESSES=${NUM_PROCESSES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)}
CONFIGS=${CONFIGS:-"multi_gpu fsdp zero2 zero3"}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
timer=()
if [ -x /usr/bin/time ]; then timer=(/usr/bin/time -v); fi  # peak host memory per launch, where GNU time exists
port=29800
for config in $CONFIGS; do
  for run in whole resumed; do
    port=$((port + 1))
    extra=()
    if [ "$run" = resumed ]; then
      extra=(--resume_from_checkpoint "$OUT/$config-whole/checkpoint-2")
    fi
    echo "== $config ($run), $NUM_PROCESSES processes"
    ${timer[@]+"${timer[@]}"} accelerate launch --config_file "examples/accelerate_configs/$config.yaml" \
      --num_processes "$NUM_PROCESSES" --main_process_port "$port" \
      examples/train_janus.py --output_dir "$OUT/$config-$run" --max_steps 4 --save_steps 2 \
      --per_device_train_batch_size 4 --compare_scans 16 --picture_steps 2 --disable_tqdm true ${extra[@]+"${extra[@]}"} \
      > "$OUT/$config-$run.log" 2> "$OUT/$config-$run.err" || { tail -40 "$OUT/$config-$run.err"; exit 1; }
    grep -A 8 "Accuracy on" "$OUT/$config-$run.log" || true
    grep "Maximum resident" "$OUT/$config-$run.err" || true
  done
  python - "$OUT/$config-whole" "$OUT/$config-resumed" <<'PY'
import sys

import torch
from safetensors.torch import load_file

whole, resumed = sys.argv[1], sys.argv[2]
for name in ("adapter_model.safetensors", "perturber/model.safetensors"):
    a, b = load_file(f"{whole}/{name}"), load_file(f"{resumed}/{name}")
    assert a.keys() == b.keys(), name
    assert a, f"{whole}/{name} holds no weights"
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    moved = any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k) if "adapter" in name else True
    assert moved, f"{whole}/{name}: the adapter did not train"
    torch.testing.assert_close({k: v.float() for k, v in b.items()}, {k: v.float() for k, v in a.items()},
                               rtol=2e-2, atol=2e-3, msg=lambda m: f"{name}: resumed != whole\n{m}")
    print(f"{name}: resumed matches the uninterrupted run (max |diff| {worst:.2e})")
PY
done
echo "All checks passed: $CONFIGS"
