# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Peak memory of the generation-side adversary's step (`generation_adversary="reinforce"`: the teacher-forced forward
and backward over a mining round's candidates, then the perturber's update) at Janus-Pro-1B's shapes (random weights;
by default 2 of the LLM's 24 layers and 1 of the vision tower's 24, every other size real: 2048 hidden, the
102,400-token vocabulary, the 16,384-entry image codebook, 576 image tokens per candidate at 384 px), on the CPU.

Each setting runs in a fresh process: the trainer is built as a run builds it (LoRA r 16 on the LLM, the perturber at
both sites, eval mode as in mining), the run's gradient checkpointing turned on or not, and one call of
`trainer.generation_adversary.step` on a round of random candidate tokens, every candidate faithful (so every one takes
part). A thread samples the process's resident memory (RSS) every 5 ms; the figure is the peak during the step less
the RSS just before it. Settings: `--chunk_sizes` (`generation_adversary_chunk_size`; `0` leaves the field out, for
code from before chunking) with and without gradient checkpointing (`--checkpointing`).

```bash
python benchmarks/reinforce_memory.py --output_json reinforce_memory.json
python benchmarks/reinforce_memory.py --chunk_sizes 0 --checkpointing on --code_root /path/to/older/checkout
```

CPU RSS stands in for accelerator memory here (float32 weights and activations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> dict:
    import torch
    from peft import LoraConfig
    from sharded_memory import RssSampler, build_model

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.interfaces.base import unwrap_model
    from trl_unigame.testing import tiny_vqa_dataset

    model, processor = build_model(args.llm_layers, args.vision_layers)
    chunk = {} if args.chunk_size == 0 else {"generation_adversary_chunk_size": args.chunk_size}
    with tempfile.TemporaryDirectory() as output_dir:
        config = UniGameConfig(
            output_dir=output_dir,
            use_cpu=True,
            per_device_train_batch_size=args.prompts,
            report_to=[],
            save_strategy="no",
            num_candidates=args.num_candidates,
            consistency_model=None,
            consistency_threshold=0.0,
            generation_adversary="reinforce",
            generation_temperature=1.0,
            seed=0,
            **chunk,
        )
        trainer = UniGameTrainer(
            model,
            config,
            train_dataset=tiny_vqa_dataset(8, seed=0),
            processing_class=processor,
            peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05),
            consistency_scorer=lambda images, texts: torch.ones(len(texts)),
        )
    base = unwrap_model(trainer.model)
    if args.checkpointing == "on":  # what the Trainer does at the start of training with `gradient_checkpointing=True`
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.eval()  # as in mining
    interface = trainer.interface
    grid = interface.generation_grid()
    candidates = args.prompts * args.num_candidates
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.config.vq_config.num_embeddings, (candidates, grid * grid), generator=generator)
    hardness = torch.rand(candidates, generator=generator)
    prompts = [f"A drawing of the digit {i}." for i in range(args.prompts)]
    sampler = RssSampler(interval=0.005)
    sampler.phase = "before"
    sampler.start()
    time.sleep(0.05)
    before = sampler.process.memory_info().rss
    sampler.phase = "step"
    start = time.perf_counter()
    trainer.generation_adversary.step(prompts, tokens, hardness, torch.ones(candidates), step=0)
    seconds = time.perf_counter() - start
    time.sleep(0.02)  # the sampler's last look at the step
    sampler.phase = "after"
    sampler.stop()
    logged = trainer.game_metrics.reduce()
    return {
        "chunk_size": args.chunk_size,
        "checkpointing": args.checkpointing,
        "candidates": candidates,
        "image_tokens": grid * grid,
        "rss_before": before,
        "peak_rss_step": sampler.peaks["step"],
        "step_peak_over_before": sampler.peaks["step"] - before,
        "seconds": seconds,
        "loss": logged.get("unigame/generation_adversary_loss"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm_layers", type=int, default=2)
    parser.add_argument("--vision_layers", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--num_candidates", type=int, default=3)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[6, 4, 1])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--code_root", default=ROOT, help="The checkout whose `trl_unigame` is measured.")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.checkpointing = args.checkpointing[0]
        print(json.dumps(worker(args)))
        return
    rows = []
    for checkpointing in args.checkpointing:
        for chunk_size in args.chunk_sizes:
            command = [sys.executable, os.path.abspath(__file__), "--worker", "--chunk_size", str(chunk_size)]
            command += ["--checkpointing", checkpointing, "--llm_layers", str(args.llm_layers)]
            command += ["--vision_layers", str(args.vision_layers), "--prompts", str(args.prompts)]
            command += ["--num_candidates", str(args.num_candidates)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": args.code_root}
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"the worker failed:\n{result.stderr[-4000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"checkpointing {checkpointing}, chunk {chunk_size or 'all (field unset)'}: step peak "
                f"{row['step_peak_over_before'] / 2**30:.2f} GiB over {row['rss_before'] / 2**30:.2f} GiB, "
                f"{row['seconds']:.1f} s, loss {row['loss']}",
                flush=True,
            )
    print("\n| gradient checkpointing | candidates per pass | step's peak RSS over the RSS before (GiB) | s |")
    print("|---|---|---|---|")
    for row in rows:
        chunk = row["chunk_size"] or "all (field unset)"
        print(
            f"| {row['checkpointing']} | {chunk} | {row['step_peak_over_before'] / 2**30:.2f} | {row['seconds']:.1f} |"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
