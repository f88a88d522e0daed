# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Times `UniGameEvaluator` on 1,000 rows, clean plus one 5-step attack, on the tiny random Janus (whose answers never
stop early: every answer is the full `max_new_tokens`, the worst case), at two batch sizes.

```bash
python benchmarks/evaluation_speed.py [--rows 1000] [--threads 1]
```
"""

import argparse
import time

import torch


def main():
    from trl_unigame.evaluation import UniGameEvaluator
    from trl_unigame.testing import tiny_janus, tiny_vqa_dataset

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = tiny_janus(seed=0)
    rows = tiny_vqa_dataset(args.rows, seed=2)
    print(f"{args.rows} rows, clean + attack (5 PGD steps), {torch.get_num_threads()} threads")
    print("| batch size | seconds | rows per second |\n|---|---|---|")
    for batch_size in (32, 64):
        evaluator = UniGameEvaluator(model, processor, batch_size=batch_size, show_progress=False)
        start = time.perf_counter()
        evaluator.evaluate(rows)
        seconds = time.perf_counter() - start
        print(f"| {batch_size} | {seconds:.1f} | {args.rows / seconds:.0f} |")


if __name__ == "__main__":
    main()
