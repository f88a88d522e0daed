# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
The GPU check: what a GPU user runs, verified and timed on one CUDA device in at most about 8 minutes, with no Hub.

```bash
bash scripts/gpu_check.sh OUT_DIR            # on a GPU machine
bash scripts/gpu_check.sh OUT_DIR --smoke    # tiny shapes, a few steps, any machine (the test suite runs it)
```

Stages, each in its own process with its own time limit (a stage that fails or runs out of time is recorded and the
next one runs):

1. `preflight`: imports the stack and prints each version and the device; stops everything at once when something is
   missing, naming it.
2. `gpu_tests`: `pytest -m gpu tests/test_gpu.py` (CUDA placement, bf16 autocast, fp16 with accelerate's `GradScaler`
   and a forced overflow, 4-bit QLoRA with bitsandbytes on the shipped digits model, compiled mining with its CUDA-graph
   replays counted). Needs pytest on the machine.
3. `main_job`: `examples/train_janus.py` with no arguments (the shipped digits model, on the GPU), its before/after
   table kept.
4. `step_overhead`: `benchmarks/step_overhead.py` at Janus-Pro-1B's shapes with random weights in bf16: a plain step,
   the game step (first-order, gradient-reading perturber, no mining), the full game mining every 4 steps, the game
   with the generation-side adversary (the peak memory of its REINFORCE pass), and mining throughput at 384 and 256 px,
   eager and compiled, against transformers' `generate`.

Writes `OUT_DIR/gpu_check.json` (every figure and each stage's status and tail of output) and `OUT_DIR/gpu_check.md`
(the table for docs/benchmarks.md, with the targets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "evaluate", "safetensors", "tokenizers"]
OPTIONAL = ["bitsandbytes", "pytest"]
TORCH_FLOOR = "2.13"  # pyproject.toml's
# Targets at Janus-Pro-1B's shapes (docs/benchmarks.md).
# Targets at Janus-Pro-1B's shapes (docs/benchmarks.md): a figure, the side it must stay on, the bound.
TARGETS = {
    "game_no_mining_first_order_gradient": ("<=", 1.3),  # time ratio to a plain step
    "game_m4_first_order": ("<=", 2.5),
    "generate_images_compiled": (">=", 1.3),  # image tokens per second over transformers' generate
}


def target_mark(name: str, value: float) -> str:
    """`"<= 1.3: met"` for a figure with a target, else `""`."""
    if name not in TARGETS:
        return ""
    side, bound = TARGETS[name]
    met = value <= bound if side == "<=" else value >= bound
    return f"{side} {bound}: {'met' if met else 'missed'}"


def preflight() -> dict:
    """Each package's version (or `None` when it does not import) and the device."""
    import importlib

    versions, missing = {}, []
    for name in STACK + OPTIONAL:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # a broken install raises other errors than ImportError
            versions[name] = None
            if name in STACK:
                missing.append(f"{name} ({type(err).__name__}: {err})")
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    floor = tuple(int(v) for v in TORCH_FLOOR.split("."))
    found = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    notes = [] if found >= floor else [f"torch {torch.__version__} is older than the package's floor {TORCH_FLOOR}: "
                                       "FSDP is refused, the rest runs untested on it"]  # fmt: skip
    return {"versions": versions, "device": device, "missing": missing, "notes": notes}


def run_stage(name: str, command: list[str], timeout: float, out_dir: str) -> dict:
    """Runs one stage in its own process group (a stage out of time is killed with every process it started); its
    status, time, the tail of its output and its last line on stdout."""
    print(f"== {name}: {' '.join(command)} (limit {timeout:.0f} s)", flush=True)
    start = time.perf_counter()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    output = stdout + stderr
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(output)
    print(f"   {status} in {seconds:.0f} s", flush=True)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return {"status": status, "seconds": round(seconds, 1), "tail": output[-2500:], "last_line": last}


def benchmark_stages(smoke: bool, work_dir: str) -> dict[str, tuple[list[str], float]]:
    """The benchmark's stages: `benchmarks/step_overhead.py` split so that one out of time loses only its own figures:
    the steps (plain, the game step, the full game mining every 4 steps), the step with the generation-side adversary
    (its REINFORCE pass's peak memory), and mining throughput. Each: command and time limit (s)."""
    script = [sys.executable, "benchmarks/step_overhead.py"]
    if smoke:
        shapes = ["--preset", "tiny", "--batch_size", "2", "--num_candidates", "2"]
        steps, reinforce_steps, sizes, limits = ["--steps", "3", "--warmup", "1"], ["--steps", "2"], ["16", "8"], 120
    else:
        shapes = ["--shapes", "janus-pro-1b", "--dtype", "bfloat16", "--batch_size", "4", "--num_candidates", "3"]
        steps, reinforce_steps, sizes, limits = ["--steps", "8", "--warmup", "2"], ["--steps", "3"], ["384", "256"], 0
    variants = ["game_no_mining_first_order_gradient"] + ([] if smoke else ["game_m4_first_order"])
    runs = ["--output_dir", os.path.join(work_dir, "runs")]
    return {
        "steps": (
            [*script, *shapes, *steps, "--variants", *variants, "--skip_mining", *runs,
             "--output_json", os.path.join(work_dir, "steps.json")],
            limits or 130,
        ),
        "reinforce": (
            [*script, *shapes, *reinforce_steps, "--warmup", "1", "--variants", "game_generation_adversary",
             "--skip_mining", *runs, "--output_json", os.path.join(work_dir, "reinforce.json")],
            limits or 70,
        ),
        "mining": ([*script, *shapes, "--variant", "mining", "--mining_rounds", "1", "--mining_sizes", *sizes], limits or 140),
    }  # fmt: skip


def main_job_table(output: str) -> str | None:
    """The main job's before/after table, as it printed it (the lines from its header to the blank line after it)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def report(result: dict) -> str:
    """The markdown table of the check."""
    pre = result["preflight"]
    lines = [
        f"# GPU check ({'smoke, tiny shapes' if result['smoke'] else 'Janus-Pro-1B shapes, bf16'})",
        "",
        f"Device: {pre['device'] or 'CPU (no CUDA device)'}; torch {pre['versions'].get('torch')}, transformers "
        f"{pre['versions'].get('transformers')}, bitsandbytes {pre['versions'].get('bitsandbytes')}.",
        "",
        *[f"Note: {note}." for note in pre.get("notes", [])],
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in result["stages"].items()]
    overhead = result.get("step_overhead")
    if overhead:
        lines += [
            "",
            "| variant | step (ms) | time ratio to plain | peak memory (GiB) | target |",
            "|---|---|---|---|---|",
        ]
        for variant, r in overhead["variants"].items():
            mark = target_mark(variant, r["time_ratio"])
            lines.append(
                f"| {variant} | {1e3 * r['step_s']:.1f} | {r['time_ratio']:.2f} | {r['peak_bytes'] / 2**30:.2f} | {mark} |"
            )
        mining = overhead.get("mining") or {}
        if mining:
            lines += ["", "| mining (greedy, guidance 3) | image tokens/s | ratio to transformers' generate | target |",
                      "|---|---|---|---|"]  # fmt: skip
            lines.append(f"| transformers' generate | {mining['transformers_generate']:.0f} | 1.00 | |")
            for key, value in mining.items():
                if key.startswith("generate_images") and not key.endswith("_ratio"):
                    ratio = mining.get(f"{key}_ratio")
                    mark = "" if ratio is None else target_mark(key, ratio)
                    shown = "" if ratio is None else f"{ratio:.2f}"
                    lines.append(f"| {key} | {value:.0f} | {shown} | {mark} |")
            lines.append(f"\nCompiling the one-token step took {mining['compile_s']:.0f} s.")
    if result.get("main_job_table"):
        lines += ["", "Main job (`examples/train_janus.py`, no arguments):", "", result["main_job_table"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes and a few steps, on any machine.")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"smoke": args.smoke, "preflight": preflight(), "stages": {}}
    pre = result["preflight"]
    print(json.dumps(pre, indent=1), flush=True)
    if pre["missing"] or (not args.smoke and pre["device"] is None):
        why = ", ".join(pre["missing"]) or "no CUDA device"
        result["stages"]["preflight"] = {"status": f"stopped: {why}", "seconds": 0, "tail": ""}
    else:
        python = sys.executable
        if not args.smoke:
            if pre["versions"].get("pytest"):
                result["stages"]["gpu_tests"] = run_stage(
                    "gpu_tests", [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                    timeout=120, out_dir=args.out_dir,
                )  # fmt: skip
            else:
                result["stages"]["gpu_tests"] = {
                    "status": "skipped: pytest is not installed",
                    "seconds": 0,
                    "tail": "",
                }
        # what the runs save stays out of OUT_DIR, which keeps the few files that come back from a device machine
        work_dir = tempfile.mkdtemp(prefix="unigame-gpu-check-")
        job = [python, "examples/train_janus.py", "--output_dir", os.path.join(work_dir, "main_job")]
        if args.smoke:
            job += ["--max_steps", "1", "--picture_steps", "0"]
        result["stages"]["main_job"] = run_stage(
            "main_job", job, timeout=150 if args.smoke else 100, out_dir=args.out_dir
        )
        result["main_job_table"] = main_job_table(result["stages"]["main_job"]["tail"])
        overhead = result["step_overhead"] = {"variants": {}, "mining": None}
        for name, (command, limit) in benchmark_stages(args.smoke, work_dir).items():
            stage = result["stages"][name] = run_stage(name, command, timeout=limit, out_dir=args.out_dir)
            if stage["status"] != "ok":
                continue
            if name == "mining":
                overhead["mining"] = json.loads(stage["last_line"])
            else:
                with open(os.path.join(work_dir, f"{name}.json")) as f:
                    figures = json.load(f)
                plain = overhead["variants"].setdefault("plain", figures["variants"]["plain"])
                for variant, r in figures["variants"].items():  # each stage's ratios are to its own plain step
                    overhead["variants"].setdefault(variant, r)
                overhead.setdefault("device", figures["device"])
                overhead.setdefault("model", figures["model"])
                del plain
    with open(os.path.join(args.out_dir, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = report(result)
    with open(os.path.join(args.out_dir, "gpu_check.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    return result


if __name__ == "__main__":
    main()
