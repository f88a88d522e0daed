# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Step-time and peak-memory overhead of UniGame against a plain `transformers.Trainer` step on the same model and batch.

```bash
python benchmarks/step_overhead.py                      # tiny random Janus on CPU
python benchmarks/step_overhead.py --model_name_or_path deepseek-community/Janus-Pro-1B --batch_size 4 --dtype bfloat16
```

Each variant runs in its own process (so peak memory is its own) for `--steps` optimizer steps; the median step
time after `--warmup` steps is compared. Prints one line per variant and the ratios to the plain step.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


VARIANTS = {
    "plain": "plain Trainer step (clean loss only)",
    "game_no_mining": "UniGame step without mining (perturber step + clean + buffer)",
    "game_m1": "UniGame step, mining every step (m = 1, the default)",
    "game_m4": "UniGame step, mining every 4 steps (m = 4)",
}


def run_variant(variant, args):
    import torch
    from peft import LoraConfig
    from transformers import Trainer, TrainerCallback

    from trl_unigame import UniGameConfig, UniGameTrainer, get_interface
    from trl_unigame.testing import tiny_janus, tiny_vqa_dataset

    if args.model_name_or_path:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
        processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    else:
        model, processor = tiny_janus(seed=0)
    data = tiny_vqa_dataset(args.batch_size * (args.steps + 1), seed=0, image_size=64)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        model.to("cuda")
    config = UniGameConfig(
        output_dir=os.path.join(args.output_dir, variant),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10**6,
        use_cpu=not on_gpu,
        bf16=args.dtype == "bfloat16" and on_gpu,
        consistency_model=None,
        mining_interval={"game_no_mining": 0, "game_m1": 1, "game_m4": 4}.get(variant, 1),
        num_candidates=args.num_candidates,
        buffer_batch_size=args.batch_size,
        hardness_quantile=0.0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    if variant == "plain":
        from trl_unigame.data import UniGameDataCollator
        from trl_unigame.unigame_trainer import prepare_understanding_player

        interface = get_interface(model, processor)
        model = prepare_understanding_player(model, interface, lora)
        interface = get_interface(model, processor)
        collator = UniGameDataCollator(interface)

        class PlainTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs.pop("unigame_rows", None)
                return interface.understanding_loss(model, inputs).mean()

        trainer = PlainTrainer(model, config, train_dataset=data, data_collator=collator, callbacks=[Timer()])
    else:
        trainer = UniGameTrainer(
            model, config, train_dataset=data, processing_class=processor, peft_config=lora, callbacks=[Timer()]
        )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = times[args.warmup :] or times
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "step_s": statistics.median(steady), "peak_bytes": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_candidates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--output_dir", default="/tmp/unigame-benchmark")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args.variant, args)

    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["plain"]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {device}; model: {args.model_name_or_path or 'tiny random Janus'}; batch {args.batch_size}; "
        f"K = {args.num_candidates}; median of steps {args.warmup + 1}..{args.steps}"
    )
    print(f"{'variant':<16} {'step (ms)':>10} {'time ratio':>11} {'peak memory ratio':>18}  description")
    for variant, r in results.items():
        print(
            f"{variant:<16} {1e3 * r['step_s']:>10.1f} {r['step_s'] / base['step_s']:>11.2f} "
            f"{r['peak_bytes'] / base['peak_bytes']:>18.2f}  {VARIANTS[variant]}"
        )


if __name__ == "__main__":
    main()
