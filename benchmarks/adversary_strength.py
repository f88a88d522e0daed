# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
How strong is the game's adversary? From the pretrained tiny digits Janus fine-tuned by plain SFT on the effect
benchmark's task (`benchmarks/effect.py`, method `sft`), U is frozen and a perturber of each input mode
(`perturber_inputs`) is trained by `UniGameTrainer` itself (U's learning rate 0, no mining, no buffer) for the same
number of steps on training rows, at each relative budget. On held-out test rows, `UniGameEvaluator` then measures the
accuracy clean, under the trained perturber, under FGSM (one full-budget step along the normalised gradient) and under
a 5-step PGD at the same budget. `strength = (clean - perturber) / (clean - pgd)`: 1 is as strong as PGD, 0 does
nothing.

```bash
python benchmarks/adversary_strength.py --output_json adversary.json     # about 20 minutes on 2 CPU cores
python benchmarks/adversary_strength.py --quick --output_json quick.json  # a smoke test
```

Output: `{"modes": {MODE: {BUDGET: {"clean": a, "perturber": a, "fgsm": a, "pgd": a, "strength": s}}}}`, accuracies
in percent, budgets as strings (`"0.05"`), and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from effect import COMMON, FINE_TUNED_SKILL, GAME, LORA, METHODS, TRAIN_SKILLS  # noqa: E402


MODES = ("features", "features_and_gradient")
BUDGETS = (0.02, 0.05, 0.1)


def fine_tune_u(args, train):
    """The effect benchmark's `sft` run: LoRA on the task, the game off. Returns the adapter's folder."""
    from peft import LoraConfig

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.testing import pretrained_tiny_janus

    folder = os.path.join(args.output_dir, "sft")
    model, processor = pretrained_tiny_janus()
    settings = {**COMMON, **METHODS["sft"], "max_steps": args.sft_steps}
    config = UniGameConfig(output_dir=folder, seed=args.seed, data_seed=args.seed, **settings)
    trainer = UniGameTrainer(
        model, config, train_dataset=train, processing_class=processor, peft_config=LoraConfig(**LORA)
    )
    trainer.train()
    trainer.save_model(folder)
    return folder


def train_perturber(args, train, adapter: str, mode: str, budget: float):
    """A perturber of `mode` trained by the game's own step against the frozen fine-tuned U."""
    from peft import PeftModel

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.testing import pretrained_tiny_janus

    base, processor = pretrained_tiny_janus()
    model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    settings = {
        **COMMON,
        **{k: GAME[k] for k in ("perturber_learning_rate", "adversarial_weight")},
        "learning_rate": 0.0,  # U stays as fine-tuned: only the perturber learns
        "lr_scheduler_type": "constant",
        "generation_loss_weight": 0.0,
        "mining_interval": 0,
        "buffer_weight": 0.0,
        "perturber_budget": "relative",
        "perturber_eps_max": budget,
        "perturber_eps_init": 0.9 * budget,
        "perturber_sites": ["understanding"],
        "perturber_update": args.perturber_update,
        "perturber_inputs": mode,
        "max_steps": args.perturber_steps,
    }
    config = UniGameConfig(
        output_dir=os.path.join(args.output_dir, f"{mode}-{budget:g}"), seed=args.seed, data_seed=args.seed, **settings
    )
    trainer = UniGameTrainer(model, config, train_dataset=train, processing_class=processor)
    trainer.train()
    trainer.perturber.detach()
    return trainer.model, processor, trainer.perturber


def accuracies(model, processor, perturber, test, budget: float, attack_steps: int) -> dict[str, float]:
    from trl_unigame.evaluation import UniGameEvaluator

    common = dict(batch_size=64, show_progress=False, seed=0, attack_budget="relative")
    pgd = UniGameEvaluator(
        model, processor, attack_eps=[budget], attack_steps=attack_steps, perturber=perturber, **common
    ).evaluate(test)
    # FGSM: one step of the whole budget along the normalised gradient
    fgsm = UniGameEvaluator(
        model, processor, attack_eps=[budget], attack_steps=1, attack_step_size=1.0, **common
    ).evaluate(test)
    attack = f"attack_rel{budget:g}/vqa_accuracy"
    return {
        "clean": 100 * pgd["clean/vqa_accuracy"],
        "perturber": 100 * pgd["perturber/vqa_accuracy"],
        "fgsm": 100 * fgsm[attack],
        "pgd": 100 * pgd[attack],
    }


def main(argv=None):
    from trl_unigame.testing import digits_vqa_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="/tmp/unigame-adversary")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--sft_steps", type=int, default=COMMON["max_steps"])
    parser.add_argument("--perturber_steps", type=int, default=150)
    parser.add_argument("--perturber_update", default="first_order", choices=["exact", "first_order"])
    parser.add_argument("--attack_steps", type=int, default=5)
    parser.add_argument("--test_scans", type=int, default=None, help="Test scans evaluated (default: all).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Few steps and scans, one budget: a smoke test.")
    args = parser.parse_args(argv)
    if args.quick:
        args.sft_steps, args.perturber_steps, args.test_scans, args.budgets = 4, 4, 16, [0.05]
    start = time.time()
    train = digits_vqa_dataset("train", skills=TRAIN_SKILLS, seed=0).shuffle(seed=0)
    test = digits_vqa_dataset("test", skills=(FINE_TUNED_SKILL,), seed=1, max_scans=args.test_scans)
    adapter = fine_tune_u(args, train)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in args.modes:
        for budget in args.budgets:
            model, processor, perturber = train_perturber(args, train, adapter, mode, budget)
            row = accuracies(model, processor, perturber, test, budget, args.attack_steps)
            gap = row["clean"] - row["pgd"]
            row["strength"] = (row["clean"] - row["perturber"]) / gap if gap > 0 else float("nan")
            results.setdefault(mode, {})[f"{budget:g}"] = row
            print(mode, budget, {k: round(v, 3) for k, v in row.items()}, flush=True)
    print("\n| mode | budget | clean | perturber | FGSM | PGD-5 | strength |\n|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        for budget, r in rows.items():
            print(
                f"| `{mode}` | {float(budget):.0%} | {r['clean']:.1f} | {r['perturber']:.1f} | {r['fgsm']:.1f} | "
                f"{r['pgd']:.1f} | {r['strength']:.2f} |"
            )
    report = {"modes": results, "args": vars(args), "test_rows": len(test), "minutes": (time.time() - start) / 60}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
